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


def test_the_official_subset_lists_are_one_and_ten_percent_of_imagenet_train():
    from cribo.data.registry import IMAGENET_SUBSETS

    # ImageNet-1k has 1,281,167 training images; SimCLR's lists keep floor(1 %) and floor(10 %) of them
    assert IMAGENET_SUBSETS["1percent"].images == 1_281_167 // 100
    assert IMAGENET_SUBSETS["10percent"].images == 1_281_167 // 10
    for entry in IMAGENET_SUBSETS.values():
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        # one "nXXXXXXXX_<n>.JPEG\n" name per line: between 20 and 25 bytes each
        assert 20 * entry.images <= entry.num_bytes <= 25 * entry.images


def _fake_official(tmp_path, monkeypatch, served: bytes, listed: bytes | None = None):
    """Replace the registry's 1 % list by ``listed`` (its sha256) and serve ``served`` from a local mirror."""
    import hashlib

    from cribo.data import registry

    listed = served if listed is None else listed
    entry = registry.SubsetList("1percent", "https://example.invalid/1percent.txt", "imagenet_1percent.txt",
                                hashlib.sha256(listed).hexdigest(), len(listed), listed.count(b"\n"))
    monkeypatch.setitem(registry.IMAGENET_SUBSETS, "1percent", entry)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / entry.filename).write_bytes(served)
    return mirror.as_uri()


def test_an_official_list_is_downloaded_once_and_verified(tmp_path, monkeypatch):
    listed = b"n00000001_1.JPEG\nn00000002_2.JPEG\n"
    mirror = _fake_official(tmp_path, monkeypatch, listed)
    downloads = tmp_path / "downloads"
    path = classification.resolve_subset_list("1percent", downloads, mirror, progress=False)
    assert path == downloads / "imagenet_1percent.txt" and path.read_bytes() == listed
    assert classification.read_subset_list(path) == ["n00000001_1.JPEG", "n00000002_2.JPEG"]
    # a second call finds the verified file and does not fetch (the mirror is gone)
    (tmp_path / "mirror" / "imagenet_1percent.txt").unlink()
    assert classification.resolve_subset_list("1percent", downloads, mirror, progress=False) == path


def test_a_corrupt_official_list_is_refused_and_removed(tmp_path, monkeypatch):
    from cribo.data.download import DownloadError

    listed = b"n00000001_1.JPEG\nn00000002_2.JPEG\n"
    mirror = _fake_official(tmp_path, monkeypatch, served=listed.replace(b"1_1", b"1_7"), listed=listed)
    with pytest.raises(DownloadError, match="imagenet_1percent.txt .* is corrupt: sha256"):
        classification.resolve_subset_list("1percent", tmp_path / "downloads", mirror, progress=False)
    assert list((tmp_path / "downloads").iterdir()) == []


def test_an_unknown_subset_name_names_the_official_lists(tmp_path):
    with pytest.raises(DataError, match=r"'2percent' is neither an official list \(1percent, 10percent\) nor a file"):
        classification.resolve_subset_list("2percent", tmp_path)


def test_semi_mode_on_the_official_one_percent_list(tmp_path, monkeypatch):
    common = _common(tmp_path)
    listed = b"n00000001_2.JPEG\nn00000002_1.JPEG\nn00000002_3.JPEG\n"
    mirror = _fake_official(tmp_path, monkeypatch, listed)
    out = tmp_path / "semi1.json"
    assert main(["eval", "classify", *common, "--mode", "semi", "--subset-list", "1percent", "--mirror", mirror,
                 "--downloads", str(tmp_path / "dl"), "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    # the row names the list and its hash; the official grid's weight decay for 1 % is 5e-4
    assert row["subset"] == "1percent" and row["train_images"] == 3 and row["weight_decay"] == 5e-4
    import hashlib

    assert row["subset_sha256"] == hashlib.sha256(listed).hexdigest()


def test_data_download_fetches_the_official_lists(tmp_path, monkeypatch, capsys):
    from cribo.data import registry

    listed = b"n00000001_1.JPEG\n"
    mirror = _fake_official(tmp_path, monkeypatch, listed)
    monkeypatch.setattr(registry, "IMAGENET_SUBSETS", {"1percent": registry.IMAGENET_SUBSETS["1percent"]})
    assert main(["data", "download", "imagenet-subsets", "--mirror", mirror, "--downloads", str(tmp_path / "dl"),
                 "--no-progress"]) == 0
    assert (tmp_path / "dl" / "imagenet_1percent.txt").read_bytes() == listed
    assert "1percent: " in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_fine_tune_one_classifier_and_rank_zero_writes_the_row(tmp_path):
    import subprocess
    import sys

    common = _common(tmp_path)
    subset = tmp_path / "sub.txt"
    subset.write_text("n00000001_0.JPEG\nn00000001_1.JPEG\nn00000002_0.JPEG\nn00000002_1.JPEG\n")
    out = tmp_path / "semi2.json"
    done = subprocess.run([sys.executable, "-m", "cribo.cli", "eval", "classify", *common, "--mode", "semi",
                           "--subset-list", str(subset), "--device", "cpu", "--nproc-per-node", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch.distributed.run --standalone --nproc_per_node=2" in done.stdout
    row = json.loads(out.read_text())
    # the global batch of 4 is 2 + 2: one step per epoch over the 4 listed images, one row
    assert row["world_size"] == 2 and row["train_images"] == 4 and np.isfinite(row["final_loss"])
    assert done.stdout.count("semi classification: top-1") == 1


def test_a_global_batch_that_does_not_split_is_refused(tmp_path, capsys):
    common = _common(tmp_path)
    assert main(["eval", "classify", *common, "--mode", "linear", "--nproc-per-node", "3",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "--batch-size 4 (the global batch) does not split over --nproc-per-node 3" in capsys.readouterr().err
