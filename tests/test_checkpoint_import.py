"""Reading checkpoints we did not write: official CrIBo/DINO, bare ViT weights, timm files; and our export."""

import argparse

import pytest
import torch
from safetensors.torch import save_file

from cribo.cli import main
from cribo.config import validate_run_config
from cribo.models.backbones import CheckpointError, backbone_from_checkpoint, build_vit
from cribo.train.checkpoint import CheckpointLoadError, load_checkpoint, save_checkpoint

MODEL = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 2}


def _vit(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_vit(validate_run_config({"model": {**MODEL, **overrides}})["model"], drop_path_rate=0.0).eval()


def _patch_tokens(vit, x):
    with torch.no_grad():
        tokens = vit.forward_features(x)[:, 1:]
    side = x.shape[-1] // 8
    return tokens.reshape(x.shape[0], side, side, -1)


def _same_features(model, vit, size=32):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(model.eval()(x), _patch_tokens(vit, x), atol=1e-6)


def test_official_checkpoint_with_namespace_args_loads(tmp_path):
    vit = _vit()
    backbone = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    head = {"head.mlp.0.weight": torch.zeros(4, 192), "head.last_layer.weight_g": torch.ones(8, 1)}
    official = {"student": {f"module.{k}": v for k, v in {**backbone, **head}.items()},
                "teacher": {**backbone, **head}, "epoch": 300,
                "args": argparse.Namespace(arch="vit_tiny", patch_size=8, n_tokens=64, use_fp16=True)}
    path = tmp_path / "cribo_official.pth"
    torch.save(official, path)  # pickles the Namespace, as the official code does
    ckpt = load_checkpoint(path)
    assert ckpt["args"] == {"arch": "vit_tiny", "patch_size": 8, "n_tokens": 64, "use_fp16": True}
    model = backbone_from_checkpoint(ckpt, str(path))
    assert model.default_img_size == 32 and model.source_method == "official"
    assert _same_features(model, vit)
    assert _same_features(model, vit, size=48)  # another input size: position embeddings interpolated


def test_official_checkpoint_carrying_code_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"teacher": {}, "args": Payload()}, path)
    with pytest.raises(CheckpointLoadError, match="refused to load.*GLOBAL io.open"):
        load_checkpoint(path)
    assert not sentinel.exists()
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert not sentinel.exists() and not (tmp_path / "x.safetensors").exists()


def test_bare_dino_style_state_dict_is_read_from_its_shapes(tmp_path):
    vit = _vit(seed=3)
    path = tmp_path / "dino_vit.pth"
    torch.save({f"module.{k}": v for k, v in vit.state_dict().items()}, path)
    model = backbone_from_checkpoint(load_checkpoint(path), str(path))
    assert len(model.vit.blocks) == 2 and model.embed_dim == 192 and model.patch_size == 8
    assert _same_features(model, vit)


def test_timm_weights_from_a_local_safetensors_file(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ckpt = load_checkpoint(path)
    model = backbone_from_checkpoint(ckpt, str(path), timm_model="vit_tiny_patch16_224").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref.forward_features(x)[:, 1:].reshape(1, 4, 4, -1)
        assert torch.allclose(model(x), expected, atol=1e-5)  # built at the 64 px grid of the weights


def test_another_architecture_lists_missing_and_unexpected_keys(tmp_path):
    cfg = validate_run_config({"method": "random", "model": MODEL})
    deeper = _vit(depth=3)
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"method": "random", "config": cfg,
                     "teacher": {f"backbone.{k}": v for k, v in deeper.state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks\.2\."):
        backbone_from_checkpoint(load_checkpoint(path), str(path))


def test_export_is_a_slim_safetensors_backbone_usable_as_checkpoint(tmp_path, tiny_voc):
    cfg = validate_run_config({"method": "random", "model": MODEL})
    vit = _vit(seed=5)
    ckpt = tmp_path / "ckpt.pth"
    save_checkpoint({"method": "cribo", "config": cfg,
                     "teacher": {**{f"backbone.{k}": v for k, v in vit.state_dict().items()},
                                 "head.mlp.0.weight": torch.zeros(2048, 192)},
                     "optimizer": {"state": {0: {"exp_avg": torch.zeros(4096, 512)}}}}, ckpt)
    out = tmp_path / "slim.safetensors"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    exported = load_checkpoint(out)
    assert set(exported) - {"__metadata__"} == set(vit.state_dict())  # backbone only: no head, no optimizer
    backbone_bytes = sum(v.numel() * 4 for v in vit.state_dict().values())
    assert backbone_bytes < out.stat().st_size < backbone_bytes + 65536
    assert exported["__metadata__"]["method"] == "cribo"
    model = backbone_from_checkpoint(exported, str(out))
    assert model.default_img_size == 32 and _same_features(model, vit)
    # and `cribo extract` takes it through --checkpoint
    assert main(["extract", "--checkpoint", str(out), "--dataset", "voc", "--data-root", str(tiny_voc),
                 "--split", "val", "--out", str(tmp_path / "feats"), "--no-progress"]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "slim.pth")]) == 2


def test_imported_baseline_is_a_run_checkpoint_with_the_same_features(tmp_path):
    import json

    import timm

    from cribo.cli import main

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64).eval()
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    out = tmp_path / "run" / "pretrain"
    assert main(["import-baseline", "--weights", str(weights), "--timm-model", "vit_tiny_patch16_224",
                 "--method", "dino", "--pretrain-data", "imagenet", "--output-dir", str(out),
                 "--summary", str(out / "summary.json")]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    # what the paper tables match on
    assert ckpt["config"]["method"] == "dino" and ckpt["config"]["data"]["dataset"] == "imagenet"
    assert ckpt["config"]["model"]["arch"] == "vit_tiny" and ckpt["config"]["model"]["patch_size"] == 16
    model = backbone_from_checkpoint(ckpt, "imported").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ref.forward_features(x)[:, 1:].reshape(1, 4, 4, -1), atol=1e-5)
    assert json.loads((out / "summary.json").read_text())["baseline"] is True
    assert main(["import-baseline", "--weights", str(tmp_path / "missing.pth"), "--method", "dino",
                 "--output-dir", str(out)]) == 2
