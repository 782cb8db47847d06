"""method: supervised, the toy tables' ceiling: the backbone trained on the masks, kept like any run."""

import json

import pytest
import torch
import yaml

from cribo.cli import main
from cribo.config import validate_run_config
from cribo.data.toyscenes import generate
from cribo.models.backbones import backbone_from_checkpoint, build_vit
from cribo.train.checkpoint import load_checkpoint

TINY_MODEL = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1, "embed_dim": 16, "num_heads": 2}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("sup") / "toy", num_train=16, num_val=2, image_size=32, seed=0,
                    workers=1, progress=False)


def _config(tmp_path, root, epochs):
    cfg = {"method": "supervised", "seed": 0, "data": {"dataset": "toyscenes", "root": str(root), "split": "train"},
           "model": TINY_MODEL, "optim": {"epochs": epochs, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0},
           "train": {"device": "cpu", "num_workers": 0, "progress": False}}
    path = tmp_path / f"sup{epochs}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_supervised_trains_the_backbone_and_resumes(tmp_path, toy, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path, toy, 2)), "--output-dir", str(out)]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["method"] == "supervised" and ckpt["epoch"] == 2
    epochs = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1] and all(e["loss"] == e["loss"] for e in epochs)

    # the kept backbone is what evaluation loads, and training moved it away from its seeded init
    backbone = backbone_from_checkpoint(ckpt, out / "checkpoint.pth")
    torch.manual_seed(0)
    init = build_vit(validate_run_config({"model": TINY_MODEL})["model"])
    trained = dict(backbone.vit.named_parameters())
    moved = [name for name, p in init.named_parameters() if not torch.equal(p, trained[name])]
    assert "patch_embed.proj.weight" in moved and any(name.startswith("blocks.0.") for name in moved)

    # the same command again resumes from the last whole epoch: here the end, so nothing more is trained
    capsys.readouterr()
    before = (out / "checkpoint.pth").stat().st_mtime_ns
    assert main(["train", "--config", str(_config(tmp_path, toy, 2)), "--output-dir", str(out)]) == 0
    assert "resuming supervised training at epoch 2/2" in capsys.readouterr().out
    assert (out / "checkpoint.pth").stat().st_mtime_ns == before
    assert len((out / "log.txt").read_text().splitlines()) == 2


def test_supervised_refuses_another_methods_checkpoint(tmp_path, toy, capsys):
    out = tmp_path / "run"
    random_cfg = tmp_path / "random.yaml"
    random_cfg.write_text(yaml.safe_dump({"method": "random", "model": TINY_MODEL,
                                          "data": {"dataset": "toyscenes", "root": str(toy)}}))
    assert main(["train", "--config", str(random_cfg), "--output-dir", str(out)]) == 0
    assert main(["train", "--config", str(_config(tmp_path, toy, 1)), "--output-dir", str(out)]) != 0
    err = capsys.readouterr().err
    assert "was trained with other settings" in err and "--output-dir" in err
