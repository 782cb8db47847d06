"""ResNet backbones in the dense protocols: res5 maps, torchvision-layout imports, feature stores."""

import json

import numpy as np
import pytest
import torch

from cribo.cli import main
from cribo.models.backbones import (CheckpointError, ResNetFeatures, backbone_from_checkpoint, build_resnet,
                                    resnet_from_state)
from cribo.train.checkpoint import load_checkpoint, save_checkpoint


def _tiny(seed=0):
    torch.manual_seed(seed)
    return build_resnet("resnet_tiny").eval()


def test_res5_map_is_channels_last_at_stride_32_and_pools_to_the_torchvision_vector():
    resnet = _tiny()
    features = ResNetFeatures(resnet).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fmap = features(x)
        pooled = resnet(x)  # torchvision forward: global average pool of res5 (fc removed)
    assert features.patch_size == 32 and features.embed_dim == 512 and features.feature_map == "res5"
    assert fmap.shape == (2, 64 // 32, 96 // 32, 512)
    assert torch.allclose(fmap.mean(dim=(1, 2)), pooled, atol=1e-5)


def test_resnet50_builder_has_the_torchvision_layout():
    from torchvision.models import resnet50

    ours = build_resnet("resnet50")
    reference = {k: v.shape for k, v in resnet50(weights=None).state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == reference
    assert ResNetFeatures(ours).embed_dim == 2048


def test_torchvision_layout_weights_under_prefixes_load_with_their_depth(tmp_path):
    resnet = _tiny(seed=3)
    state = {f"module.encoder_k.{k}": v for k, v in resnet.state_dict().items()}
    state["module.encoder_k.fc.weight"] = torch.zeros(10, 512)  # a classifier is ignored
    path = tmp_path / "released.pth"
    torch.save({"state_dict": state, "epoch": 800}, path)
    backbone = backbone_from_checkpoint(load_checkpoint(path), str(path)).eval()
    assert isinstance(backbone, ResNetFeatures) and backbone.arch == "resnet_tiny"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone(x), ResNetFeatures(resnet).eval()(x))


def test_two_resnets_in_one_file_without_a_preferred_prefix_is_an_error():
    state = _tiny().state_dict()
    mixed = {**{f"online_net.0.{k}": v for k, v in state.items()}, **{f"target_net.0.{k}": v for k, v in state.items()}}
    with pytest.raises(CheckpointError, match="several ResNets"):
        backbone_from_checkpoint(mixed, "orl_full.pth")


def test_unknown_depth_names_the_block_counts():
    state = {k: v for k, v in _tiny().state_dict().items()}
    state.update({k.replace("layer3.0.", "layer3.1."): v for k, v in state.items() if k.startswith("layer3.0.")
                  and "downsample" not in k})
    with pytest.raises(CheckpointError, match=r"\[1, 1, 2, 1\] basic blocks"):
        resnet_from_state(state, "odd.pth")


def _imported_run(tmp_path) -> str:
    weights = tmp_path / "r.pth"
    torch.save(_tiny(seed=1).state_dict(), weights)
    run = tmp_path / "run"
    assert main(["import-baseline", "--weights", str(weights), "--method", "orl", "--pretrain-data", "coco",
                 "--output-dir", str(run)]) == 0
    return str(run / "checkpoint.pth")


def test_imported_resnet_linear_probe(tmp_path, tiny_voc):
    ckpt = _imported_run(tmp_path)
    (tiny_voc / "ImageSets/Segmentation/trainaug.txt").write_text((tiny_voc / "ImageSets/Segmentation/train.txt").read_text())
    assert main(["eval", "linear", "--checkpoint", ckpt, "--dataset", "voc", "--data-root", str(tiny_voc),
                 "--image-size", "64", "--no-progress", "--batch-size", "6", "--epochs", "1", "--drop-at", "1",
                 "--mask-size", "16", "--out", str(tmp_path / "li.json")]) == 0
    row = json.loads((tmp_path / "li.json").read_text())
    assert row["arch"] == "resnet_tiny" and 0 <= row["miou"] <= 100


def test_imported_resnet_extraction_incontext_overclustering_figures(tmp_path, tiny_voc):
    ckpt = _imported_run(tmp_path)
    cfg = load_checkpoint(ckpt)["config"]
    assert cfg["model"]["arch"] == "resnet_tiny" and cfg["model"]["patch_size"] == 32
    common = ["--checkpoint", ckpt, "--dataset", "voc", "--data-root", str(tiny_voc), "--image-size", "128",
              "--no-progress", "--batch-size", "4"]
    assert main(["extract", *common, "--split", "train", "--out", str(tmp_path / "tr")]) == 0
    assert main(["extract", *common, "--split", "val", "--out", str(tmp_path / "va")]) == 0
    meta = json.loads((tmp_path / "va" / "meta.json").read_text())
    assert (meta["stride"], meta["feature_map"], meta["grid"], meta["embed_dim"]) == (32, "res5", [4, 4], 512)
    assert np.load(tmp_path / "va" / "features.npy").shape == (2, 16, 512)
    assert main(["eval", "incontext", *common, "--train-features", str(tmp_path / "tr"),
                 "--val-features", str(tmp_path / "va"), "--k", "3", "--out", str(tmp_path / "ic.json")]) == 0
    row = json.loads((tmp_path / "ic.json").read_text())
    assert (row["method"], row["arch"], row["patch_size"], row["pretrain_data"]) == ("orl", "resnet_tiny", 32, "coco")
    # 2 images x 16 positions: enough points for the 21 VOC classes
    assert main(["eval", "overcluster", "--checkpoint", ckpt, "--val-features", str(tmp_path / "va"),
                 "--clusters", "classes", "--seeds", "1", "--restarts", "1", "--pca-dim", "4",
                 "--out", str(tmp_path / "oc.json")]) == 0
    assert main(["figures", *common, "--train-features", str(tmp_path / "tr"), "--val-features",
                 str(tmp_path / "va"), "--num-images", "1", "--memory-images", "2", "--k", "3",
                 "--out-dir", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "objects.png").is_file()


def test_our_resnet_run_checkpoint_round_trips(tmp_path):
    resnet = _tiny(seed=2)
    cfg = {"method": "byol", "model": {"arch": "resnet_tiny", "img_size": 64, "patch_size": 32}}
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"method": "byol", "config": cfg,
                     "teacher": {f"backbone.{k}": v for k, v in resnet.state_dict().items()}}, path)
    backbone = backbone_from_checkpoint(load_checkpoint(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone(x), ResNetFeatures(resnet).eval()(x))
    assert backbone.default_img_size == 64
