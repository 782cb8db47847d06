"""`--protocol open-hbird`: open-hummingbird-eval's choices, checked on hand-worked cases.

open-hummingbird-eval is not on PyPI (``pip download open-hummingbird-eval`` finds no
distribution), so it cannot run here; the cases below are worked out by hand from its documented
choices: ignored pixels become class 0 in the memory labels, the reported mIoU is Hungarian-matched
and averaged over all classes, inputs are normalised with std (0.229, 0.224, 0.255).
"""

import json

import numpy as np
import pytest
from PIL import Image

from cribo.cli import main
from cribo.eval.features import PREPROCESSING, _resize_pair
from cribo.eval.incontext import evaluate_incontext, ignored_as_class_zero
from cribo.eval.metrics import miou_over_all_classes


def test_ignored_pixels_become_class_zero_in_the_memory_labels():
    counts = np.array([[[0, 3, 0], [0, 0, 0], [1, 1, 2]]], dtype=np.uint16)  # 1 image, 3 patches of 2x2 px
    out = ignored_as_class_zero(counts, patch_pixels=4)
    assert out.tolist() == [[[1, 3, 0], [4, 0, 0], [1, 1, 2]]] and out.dtype == np.uint16
    with pytest.raises(ValueError, match="exceed the 2 pixels"):
        ignored_as_class_zero(counts, patch_pixels=2)


def test_reported_miou_counts_absent_classes_as_zero():
    conf = np.array([[3, 0, 0], [0, 1, 0], [0, 0, 0]])  # class 2 never occurs nor is predicted
    # IoU 1 and 1, class 2 counted 0: (1 + 1 + 0) / 3
    assert miou_over_all_classes(conf) == pytest.approx(200 / 3)
    # Hungarian first: predictions of label 1 on class 0 and of label 0 on class 1 are swapped back
    assert miou_over_all_classes(np.array([[0, 3], [2, 0]])) == pytest.approx(100.0)


def _case():
    """One memory image of two 2x2-pixel patches: A (feature e1) all ignored pixels, B (e2) class 1.
    One query image whose patches point at A and at B; ground truth (2 x 4 pixels):
        row 0: 0 255 1 1
        row 1: 0 255 1 2
    """
    train_features = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float16)
    train_counts = np.array([[[0, 0, 0], [0, 4, 0]]], dtype=np.uint16)
    val_features = np.array([[[2.0, 0.1], [0.1, 2.0]]], dtype=np.float16)
    val_masks = np.array([[[0, 255, 1, 1], [0, 255, 1, 2]]], dtype=np.uint8)
    return train_features, train_counts, val_features, val_masks


def test_open_hbird_on_a_hand_worked_case():
    result = evaluate_incontext(*_case(), grid=(1, 2), num_classes=3, k=1, protocol="open-hbird")
    # memory: A labelled class 0 (its ignored pixels), B class 1; k = 1: the left patch predicts 0,
    # the right one 1; bilinear upsampling of 2 columns to 4 (align_corners False) samples input
    # columns -0.25, 0.25, 0.75, 1.25, so the prediction is 0 0 1 1 on both rows.
    # Column 1 is ignored. Confusion (rows truth): class 0 -> 0 twice; class 1 -> 1 three times;
    # class 2 -> 1 once. Hungarian keeps the identity (1 + 3/4 + 0 > 1 + 1/4 + 0).
    # IoU: class 0 = 2/2, class 1 = 3/(3 + 1), class 2 = 0/1 -> mean over 3 classes.
    assert result["miou"] == pytest.approx((1 + 0.75 + 0) / 3 * 100)
    assert result["incontext_protocol"] == "open-hbird" and result["memory_entries"] == 2


def test_clean_protocol_on_the_same_case_leaves_the_ignored_patch_out():
    result = evaluate_incontext(*_case(), grid=(1, 2), num_classes=3, k=1)
    # memory: only B (class 1): everything is predicted 1. Class 0: 0/2, class 1: 3/(3 + 3), class 2: 0/1
    assert result["miou"] == pytest.approx((0 + 0.5 + 0) / 3 * 100)
    assert result["incontext_protocol"] == "clean" and result["memory_entries"] == 1


def test_open_hbird_preprocessing_uses_its_std():
    image = Image.new("RGB", (4, 4), (255, 0, 128))
    x, _ = _resize_pair(2, "open-hbird")(image, np.zeros((4, 4), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.255)
    expected = [(1 - mean[0]) / std[0], (0 - mean[1]) / std[1], (128 / 255 - mean[2]) / std[2]]
    assert x[:, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert PREPROCESSING["clean"]["std"][2] == 0.225


def test_cli_open_hbird_row_and_refusal_of_clean_stores(tmp_path, tiny_voc):
    import yaml

    cfg = tmp_path / "pixels.yaml"
    cfg.write_text(yaml.safe_dump({"method": "pixels", "data": {"dataset": "voc", "root": str(tiny_voc), "split": "train"},
                                   "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32},
                                   "train": {"device": "cpu", "num_workers": 0, "progress": False}}))
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "run")]) == 0
    ckpt = str(tmp_path / "run" / "checkpoint.pth")
    (tiny_voc / "ImageSets/Segmentation/trainaug.txt").write_text(
        (tiny_voc / "ImageSets/Segmentation/train.txt").read_text())
    common = ["--checkpoint", ckpt, "--dataset", "voc", "--data-root", str(tiny_voc), "--no-progress"]
    row_path = tmp_path / "row.json"
    assert main(["eval", "incontext", *common, "--k", "5", "--protocol", "open-hbird", "--out", str(row_path)]) == 0
    row = json.loads(row_path.read_text())
    assert row["incontext_protocol"] == "open-hbird" and 0 <= row["miou"] <= 100
    for split in ("trainaug", "val"):
        assert main(["extract", *common, "--split", split, "--out", str(tmp_path / split)]) == 0
    assert main(["eval", "incontext", *common, "--train-features", str(tmp_path / "trainaug"), "--val-features",
                 str(tmp_path / "val"), "--protocol", "open-hbird", "--out", str(tmp_path / "x.json")]) != 0
    assert not (tmp_path / "x.json").exists()


def test_open_hbird_masks_are_resized_by_torch_nearest():
    # 3 -> 2 pixels: torch's nearest takes source floor(x * 3 / 2) = 0, 1; PIL's the centres
    # floor((x + 0.5) * 3 / 2) = 0, 2
    mask = np.array([[1, 2, 3]] * 3, dtype=np.uint8)
    image = Image.new("RGB", (3, 3))
    _, hbird = _resize_pair(2, "open-hbird")(image, mask)
    _, clean = _resize_pair(2, "clean")(image, mask)
    assert hbird[0].tolist() == [1, 2] and clean[0].tolist() == [1, 3]
