"""VOC07 SVM and low-shot protocols: AP, cost selection, sampling, descriptors, data, CLI."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from cribo.cli import main
from cribo.data.registry import ARCHIVES, get_spec
from cribo.data.segmentation import DataError
from cribo.eval import svm
from cribo.models.backbones import PatchFeatureExtractor


def test_voc_ap_on_a_tiny_ranked_list_by_hand():
    # ranked: +, -, +, (difficult), -  -> difficult dropped: +, -, +, -; 2 positives
    # recall 1/2 at precision 1, recall 2/2 at precision 2/3 -> AP = 0.5 * 1 + 0.5 * 2/3 = 5/6
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, -1, 1, 0, -1])
    assert svm.voc_average_precision(scores, labels) == pytest.approx(5 / 6)
    # a difficult image ranked first changes nothing: it is ignored at test
    assert svm.voc_average_precision(np.r_[2.0, scores], np.r_[0, labels]) == pytest.approx(5 / 6)
    # interpolation: the precision after a dip counts: +, -, -, + -> 0.5 * 1 + 0.5 * max(2/4) = 0.75
    assert svm.voc_average_precision(np.array([4, 3, 2, 1.0]), np.array([1, -1, -1, 1])) == pytest.approx(0.75)
    # ties keep the input order (stable): perfect ranking -> 1
    assert svm.voc_average_precision(np.array([1.0, 1.0, 0.0]), np.array([1, 1, -1])) == 1.0
    with pytest.raises(ValueError, match="no positive"):
        svm.voc_average_precision(np.array([1.0]), np.array([0]))


def test_official_cost_grid():
    assert len(svm.COST_GRID) == 19
    assert svm.COST_GRID[:3] == (1.0, 10.0, 100.0)
    assert svm.COST_GRID[3] == 2 ** -4 and svm.COST_GRID[-1] == 2 ** -19


def test_cost_selection_takes_the_best_cv_ap_and_the_first_on_ties(monkeypatch):
    table = {1.0: 0.5, 10.0: 0.9, 0.5: 0.9, 0.25: 0.1}
    calls = []

    def fake(features, targets, cost, folds):
        calls.append(folds)
        return table[cost]

    monkeypatch.setattr(svm, "cross_validated_ap", fake)
    cost, aps = svm.select_cost(None, None, costs=(1.0, 10.0, 0.5, 0.25))
    assert cost == 10.0 and aps == [0.5, 0.9, 0.9, 0.1] and calls == [3, 3, 3, 3]


def test_cost_selection_for_real_on_separable_data_keeps_the_first_cost():
    # two well separated clusters: every cost ranks the held-out folds perfectly (CV AP 1) -> first cost
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(2, 0.1, (9, 4)), rng.normal(-2, 0.1, (9, 4))])
    y = np.r_[np.ones(9, int), -np.ones(9, int)]
    cost, aps = svm.select_cost(svm.l2_normalise(x), y, costs=(10.0, 1.0, 2 ** -4))
    assert aps == [1.0, 1.0, 1.0] and cost == 10.0


def test_an_svm_fit_does_not_depend_on_the_global_random_state():
    # liblinear's dual solver visits the samples in a shuffled order; LinearSVC draws that shuffle's seed
    # from numpy's global RNG unless given a random_state, so the same features gave other coefficients
    # (and another mAP in the table's second decimal) from one run to the next
    rng = np.random.default_rng(0)
    x = svm.l2_normalise(rng.normal(size=(60, 16)))
    y = np.where(rng.random(60) < 0.3, 1, -1)
    fits = []
    for global_seed in (1, 2):
        np.random.seed(global_seed)
        fits.append(svm.make_svm(0.5).fit(x, y).coef_)
    assert np.array_equal(fits[0], fits[1])


def test_difficult_is_a_negative_in_training():
    assert svm.training_targets(np.array([1, 0, -1])).tolist() == [1, -1, -1]


def test_lowshot_sampling_is_reproducible_under_a_seed():
    labels = np.array([1] * 10 + [0] * 5 + [-1] * 100)
    a = svm.lowshot_sample(labels, 4, seed=0, sample=2, class_index=7)
    assert np.array_equal(a, svm.lowshot_sample(labels, 4, seed=0, sample=2, class_index=7))
    assert not np.array_equal(a, svm.lowshot_sample(labels, 4, seed=1, sample=2, class_index=7))
    assert not np.array_equal(a, svm.lowshot_sample(labels, 4, seed=0, sample=3, class_index=7))
    assert (labels[a] == 1).sum() == 4 and (labels[a] == -1).sum() == 19 * 4 and (labels[a] == 0).sum() == 0
    assert len(np.unique(a)) == len(a)
    # fewer negatives than 19 k: all of them
    assert (labels[svm.lowshot_sample(labels, 8, 0, 0, 0)] == -1).sum() == 100
    with pytest.raises(ValueError, match="fewer than k = 16"):
        svm.lowshot_sample(labels, 16, 0, 0, 0)


def _separable(n_per_class=30, classes=2, dim=6, seed=0):
    """Each image has exactly one class; its feature is that class's axis plus small noise."""
    rng = np.random.default_rng(seed)
    which = np.repeat(np.arange(classes), n_per_class)
    x = np.eye(dim)[which] + rng.normal(0, 0.05, (len(which), dim))
    labels = -np.ones((len(which), classes), np.int8)
    labels[np.arange(len(which)), which] = 1
    return svm.l2_normalise(x), labels


def test_full_benchmark_and_both_lowshot_selections_on_separable_data():
    train_x, train_y = _separable(seed=0)
    test_x, test_y = _separable(n_per_class=10, seed=1)
    costs = (1.0, 2 ** -4)
    full = svm.svm_benchmark(train_x, train_y, test_x, test_y, costs=costs)
    assert full["map"] == pytest.approx(100.0) and full["cost_per_class"] == [1.0, 1.0]
    official = svm.lowshot_benchmark(train_x, train_y, test_x, test_y, k=2, selection="test", samples=3, costs=costs)
    assert official["selects_on_test"] and official["cost"] in costs
    assert official["map"] == pytest.approx(100.0) and official["map_std"] == pytest.approx(0.0)
    ours = svm.lowshot_benchmark(train_x, train_y, test_x, test_y, k=1, selection="cv", samples=2, costs=costs)
    assert not ours["selects_on_test"] and len(ours["cost_per_sample_class"]) == 2
    assert ours["map"] == pytest.approx(100.0)


def test_features_of_mixed_dimension_are_refused():
    with pytest.raises(ValueError, match="mixed dimension"):
        svm.svm_benchmark(np.zeros((4, 8)), -np.ones((4, 2)), np.zeros((4, 6)), -np.ones((4, 2)))


class _Map(PatchFeatureExtractor):
    patch_size, embed_dim = 1, 1

    def forward(self, images):  # B x 3 x 3 x 1 holding 0..8 row-major
        return torch.arange(9.0).reshape(1, 3, 3, 1).expand(images.shape[0], -1, -1, -1)


def test_resnet_style_descriptor_pools_to_2x2_with_kernel_h_minus_1():
    # 3 x 3 map 0..8, kernel 2, stride 1: [(0+1+3+4)/4, (1+2+4+5)/4, (3+4+6+7)/4, (4+5+7+8)/4] = [2, 3, 5, 6]
    out = svm.global_descriptor(_Map(), torch.zeros(2, 3, 3, 3))
    assert out.tolist() == [[2.0, 3.0, 5.0, 6.0]] * 2


def test_vit_descriptor_is_cls_and_mean_patch_token():
    from cribo.config import validate_run_config
    from cribo.models.backbones import ViTPatchFeatures, build_vit

    cfg = validate_run_config({"model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 16, "depth": 1}})
    backbone = ViTPatchFeatures(build_vit(cfg["model"])).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        tokens = backbone.vit.forward_features(x)
        out = svm.global_descriptor(backbone, x)
    assert out.shape == (1, 2 * 192)
    assert torch.allclose(out[0, :192], tokens[0, 0]) and torch.allclose(out[0, 192:], tokens[0, 1:].mean(0))


# ---------------------------------------------------------------- VOC 2007 data


def _xml(objects) -> bytes:
    body = "".join(f"<object><name>{n}</name>" + (f"<difficult>{int(d)}</difficult>" if d is not None else "")
                   + "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax></bndbox></object>"
                   for n, d in objects)
    return f"<annotation><filename>x.jpg</filename>{body}</annotation>".encode()


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _voc07_tar(path, split, annotations, split_list=True):
    base = "VOCdevkit/VOC2007/"
    members = {f"{base}Annotations/{i}.xml": _xml(objs) for i, objs in annotations.items()}
    members.update({f"{base}JPEGImages/{i}.jpg": _jpeg() for i in annotations})
    if split_list:
        members[f"{base}ImageSets/Main/{split}.txt"] = "".join(f"{i}\n" for i in annotations).encode()
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _fetch_voc07(tmp_path, monkeypatch, trainval, test, test_split_list=True):
    from cribo.data.fetch import fetch_dataset

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _voc07_tar(mirror / "VOCtrainval_06-Nov-2007.tar", "trainval", trainval)
    _voc07_tar(mirror / "VOCtest_06-Nov-2007.tar", "test", test, split_list=test_split_list)
    for name in ("voc2007_trainval", "voc2007_test"):  # the tiny archives have their own checksums
        monkeypatch.setitem(ARCHIVES, name, ARCHIVES[name].__class__(**{**ARCHIVES[name].__dict__, "md5": None}))
    fetch_dataset("voc2007", tmp_path / "downloads", tmp_path / "raw", mirror=mirror.as_uri(), progress=False,
                  retries=0, backoff=0)


def test_voc2007_download_and_prepare_in_the_real_layout(tmp_path, monkeypatch):
    from cribo.data.prepare import prepare
    from cribo.data.voc07 import VOC07_CLASSES, load_voc2007

    trainval = {"000005": [("chair", False), ("chair", True)], "000007": [("car", True)],
                "000009": [("horse", False), ("person", False)]}
    test = {"000001": [("dog", False), ("person", True)]}
    _fetch_voc07(tmp_path, monkeypatch, trainval, test)
    out = tmp_path / "voc2007"
    info = prepare("voc2007", tmp_path / "raw", out, progress=False)
    assert (info["trainval"], info["test"]) == (3, 1)
    data = load_voc2007(out, "trainval")
    col = {name: i for i, name in enumerate(VOC07_CLASSES)}
    expected = -np.ones((3, 20), np.int8)
    expected[0, col["chair"]] = 1  # one non-difficult chair suffices
    expected[1, col["car"]] = 0  # only a difficult car: ignored at test
    expected[2, [col["horse"], col["person"]]] = 1
    assert data.ids == ["000005", "000007", "000009"] and np.array_equal(data.labels, expected)
    assert all(p.is_file() for p in data.image_paths)
    test_labels = load_voc2007(out, "test").labels[0]
    assert test_labels[col["dog"]] == 1 and test_labels[col["person"]] == 0
    assert get_spec("voc2007").val_split == "test"


def test_voc2007_without_difficult_flags_or_a_split_is_explained(tmp_path, monkeypatch):
    from cribo.data.prepare import prepare

    _fetch_voc07(tmp_path, monkeypatch, {"000005": [("chair", None)]}, {"000001": [("dog", False)]})
    with pytest.raises(DataError, match="difficult"):
        prepare("voc2007", tmp_path / "raw", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / ".prepared.json").exists()

    other = tmp_path / "second"
    other.mkdir()
    _fetch_voc07(other, monkeypatch, {"000005": [("chair", False)]}, {"000001": [("dog", False)]},
                 test_split_list=False)
    assert main(["data", "prepare", "voc2007", "--raw", str(other / "raw"), "--out", str(other / "out"),
                 "--no-progress"]) == 2
    assert not (other / "out" / ".prepared.json").exists()


# ---------------------------------------------------------------- CLI on labels from masks


def _shapes_voc(root, n_train=16, n_val=8, size=64):
    """Images holding class 1 (red square) or class 2 (blue square) or both, on class 0."""
    from PIL import Image

    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}{i}" for i in range(n)]
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i, image_id in enumerate(ids):
            mask = np.zeros((size, size), np.uint8)
            if i % 3 in (0, 2):
                mask[4:28, 4:28] = 1
            if i % 3 in (1, 2):
                mask[36:60, 36:60] = 2
            image = np.zeros((size, size, 3), np.uint8)
            image[mask == 1], image[mask == 2] = (230, 20, 20), (20, 20, 230)
            Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / f"{image_id}.png")
    return root


def test_svm_commands_on_labels_from_masks_and_a_resnet(tmp_path):
    from cribo.models.backbones import build_resnet

    root = _shapes_voc(tmp_path / "shapes")
    torch.manual_seed(0)
    torch.save(build_resnet("resnet_tiny").state_dict(), tmp_path / "r.pth")
    assert main(["import-baseline", "--weights", str(tmp_path / "r.pth"), "--method", "byol",
                 "--output-dir", str(tmp_path / "run")]) == 0
    ckpt = str(tmp_path / "run" / "checkpoint.pth")
    common = ["--checkpoint", ckpt, "--dataset", "voc", "--data-root", str(root), "--image-size", "64", "--no-progress"]
    assert main(["extract-global", *common, "--split", "train", "--out", str(tmp_path / "tr")]) == 0
    assert main(["extract-global", *common, "--split", "val", "--out", str(tmp_path / "te")]) == 0
    meta = json.loads((tmp_path / "te" / "meta.json").read_text())
    # 64 px -> 2 x 2 res5 map -> kernel 1 -> 2 x 2 x 512; "background" is not a label
    assert meta["feature_dim"] == 4 * 512 and meta["class_names"][:2] == ["aeroplane", "bicycle"]
    labels = np.load(tmp_path / "te" / "labels.npy")
    assert labels.shape == (8, 20) and labels[0, 0] == 1 and labels[1, 0] == -1 and labels[1, 1] == 1
    x = np.load(tmp_path / "te" / "features.npy")
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    rows = ["--checkpoint", ckpt, "--train-features", str(tmp_path / "tr"), "--test-features", str(tmp_path / "te")]
    assert main(["eval", "svm", *rows, "--out", str(tmp_path / "svm.json")]) == 0
    row = json.loads((tmp_path / "svm.json").read_text())
    assert row["protocol"] == "svm" and row["classes_scored"] == 2 and 0 <= row["map"] <= 100
    assert main(["eval", "svm-lowshot", *rows, "--k", "2", "--samples", "2", "--out", str(tmp_path / "low.json")]) == 0
    low = json.loads((tmp_path / "low.json").read_text())
    assert low["protocol"] == "svm_lowshot" and low["selects_on_test"] and len(low["map_per_sample"]) == 2


def test_mixed_feature_stores_exit_with_the_fix(tmp_path, capsys):
    from cribo.data.voc07 import MultiLabelSet
    from cribo.eval.global_features import write_global_store

    for name, dim in (("a", 8), ("b", 6)):
        images = MultiLabelSet(["x", "y"], [], np.array([[1], [-1]], np.int8), ("cat",))
        write_global_store(tmp_path / name, np.ones((2, dim), np.float32), images,
                           {"dataset": "voc2007", "split": name, "image_size": 224, "descriptor": "d"})
    torch.save({"state_dict": {}}, tmp_path / "c.pth")
    assert main(["eval", "svm", "--checkpoint", str(tmp_path / "c.pth"), "--train-features", str(tmp_path / "a"),
                 "--test-features", str(tmp_path / "b"), "--out", str(tmp_path / "r.json")]) == 2
    assert "mixed dimension" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def test_svm_rows_become_the_svm_table(tmp_path):
    from cribo.results.tables import build_svm_table, run_metrics

    base = {"experiment": "e", "run_name": "orl", "method": "orl", "arch": "resnet50", "dataset": "voc2007"}
    rows = [{**base, "protocol": "svm_lowshot", "k": 2, "cost_selection": "cv", "map": 40.0, "map_std": 1.0},
            {**base, "protocol": "svm", "map": 86.7},
            {**base, "protocol": "svm_lowshot", "k": 1, "cost_selection": "test", "map": 30.0, "map_std": 2.0}]
    table = build_svm_table(rows)
    assert table["map"].tolist() == [86.7, 30.0, 40.0]  # the full benchmark first, then by k
    metrics = run_metrics(rows).set_index("metric")["value"]
    assert metrics["svm voc2007 mAP"] == 86.7 and metrics["svm voc2007 k=2 cv mAP"] == 40.0
