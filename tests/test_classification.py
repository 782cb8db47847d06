"""ImageNet-style classification: top-k by hand, subset lists, and both modes on a tiny image folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cribo.cli import main
from cribo.data.segmentation import DataError
from cribo.eval import classification


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 1, 0])
    # row 0: top-1 hit; row 1: target second -> top-2 hit only; row 2: target last -> miss at k=2
    acc = classification.topk_accuracy(logits, targets, ks=(1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(200 / 3) and acc[5] == pytest.approx(100.0)


def _folder(root, per_class=4):
    rng = np.random.default_rng(0)
    colours = {"n00000001": (220, 20, 20), "n00000002": (20, 20, 220)}
    for split in ("train", "val"):
        for wnid, colour in colours.items():
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                image = np.clip(np.array(colour) + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(root / split / wnid / f"{wnid}_{i}.JPEG")
    return root


def test_subset_list_names_must_exist_in_the_train_folder(tmp_path):
    root = _folder(tmp_path / "in")
    paths, labels, classes = classification.image_folder(root, "train")
    assert classes == ["n00000001", "n00000002"] and len(paths) == 8 and labels.count(1) == 4
    good = tmp_path / "1percent.txt"
    good.write_text("n00000001/n00000001_0.JPEG 0\nn00000002_3.JPEG\n")
    sub_paths, sub_labels = classification.apply_subset(paths, labels, classification.read_subset_list(good), "l")
    assert [p.name for p in sub_paths] == ["n00000001_0.JPEG", "n00000002_3.JPEG"] and sub_labels == [0, 1]
    bad = tmp_path / "bad.txt"
    bad.write_text("n00000001_0.JPEG\nn01440764_10026.JPEG\n")
    with pytest.raises(DataError, match=r"1 of the 2 images of .*bad.txt are not in the training folder.*n01440764_10026"):
        classification.apply_subset(paths, labels, classification.read_subset_list(bad), str(bad))


def _common(tmp_path):
    from cribo.models.backbones import build_resnet

    root = _folder(tmp_path / "in")
    torch.manual_seed(0)
    torch.save(build_resnet("resnet_tiny").state_dict(), tmp_path / "r.pth")
    return ["--checkpoint", str(tmp_path / "r.pth"), "--data-root", str(root), "--image-size", "32",
            "--batch-size", "4", "--epochs", "1", "--no-progress"]


def test_linear_mode_writes_a_row(tmp_path):
    common = _common(tmp_path)
    assert main(["eval", "classify", *common, "--mode", "linear", "--out", str(tmp_path / "lin.json")]) == 0
    row = json.loads((tmp_path / "lin.json").read_text())
    assert row["protocol"] == "classify_linear" and row["train_images"] == 8 and 0 <= row["top1"] <= 100
    assert row["top5"] == 100.0  # two classes: the target is always among the top 5


def test_semi_mode_trains_on_the_subset_and_refuses_unknown_names(tmp_path):
    common = _common(tmp_path)
    subset = tmp_path / "sub.txt"
    subset.write_text("n00000001_0.JPEG\nn00000002_0.JPEG\n")
    assert main(["eval", "classify", *common, "--mode", "semi", "--subset-list", str(subset), "--lr", "0.01",
                 "--head-lr-mult", "10", "--out", str(tmp_path / "semi.json")]) == 0
    semi = json.loads((tmp_path / "semi.json").read_text())
    assert semi["train_images"] == 2 and semi["head_lr_mult"] == 10 and np.isfinite(semi["final_loss"])
    missing = tmp_path / "missing.txt"
    missing.write_text("n09999999_1.JPEG\n")
    assert main(["eval", "classify", *common, "--mode", "semi", "--subset-list", str(missing),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
