"""The toy scenes as a classification set: the label rule, the subsets, the folder and its errors."""

import json

import numpy as np
import pytest

from cribo.cli import main
from cribo.data.toy_classification import dominant_object, subset_ids, write_image_folder
from cribo.eval.classification import image_folder, read_subset_list


def test_the_label_is_the_largest_object_ignoring_stuff_and_borders():
    # stuff ids 0-2, objects from 3; 255 = border
    mask = np.array([[0, 0, 0, 0],
                     [1, 4, 4, 255],
                     [5, 5, 5, 255],
                     [255, 255, 255, 255]], dtype=np.uint8)
    assert dominant_object(mask, 3, 255) == 5          # 3 pixels of class 5 against 2 of class 4
    mask[0, :2] = 4                                     # 4 pixels of class 4 now
    assert dominant_object(mask, 3, 255) == 4
    mask[0, 2] = 5                                      # 4 against 4: the lower id
    assert dominant_object(mask, 3, 255) == 4
    assert dominant_object(np.array([[0, 1], [2, 255]], np.uint8), 3, 255) is None


def test_subsets_take_the_first_ids_of_each_class():
    ids = {"disk": [f"train_{i:06d}" for i in (9, 3, 5, 1)], "star": ["train_000002"]}
    # 10 % of 4 -> ceil(0.4) = 1, of 1 -> 1; 50 % of 4 -> 2
    assert subset_ids(ids, 10) == ["train_000001", "train_000002"]
    assert subset_ids(ids, 50) == ["train_000001", "train_000003", "train_000002"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from cribo.data.toyscenes import generate

    return generate(tmp_path_factory.mktemp("toy") / "toy", num_train=40, num_val=24, image_size=32, seed=0,
                    workers=1, progress=False)


def test_the_folder_holds_every_image_once_under_its_label(toy, tmp_path):
    out = tmp_path / "folder"
    assert main(["data", "toy-folder", "--toy-root", str(toy), "--out", str(out), "--percents", "10", "50"]) == 0
    summary = json.loads((out / ".prepared.json").read_text())
    paths, labels, classes = image_folder(out, "train")
    assert len(paths) == 40 - len([i for i in summary["images_without_an_object"] if i.startswith("train")])
    assert classes == summary["classes"] and set(classes) <= {"disk", "square", "triangle", "star", "cross", "hexagon"}
    # each image sits under the class covering most of its mask
    meta = json.loads((toy / "meta.json").read_text())
    from PIL import Image

    for path, label in zip(paths, labels):
        mask = np.asarray(Image.open(toy / "SegmentationClass" / f"{path.stem}.png"))
        assert meta["classes"][dominant_object(mask, 3, 255)] == classes[label]
        assert path.read_bytes() == (toy / "JPEGImages" / path.name).read_bytes()
    # the 50 % list: per class, half of its images rounded up
    half = read_subset_list(out / "subsets" / "50percent.txt")
    assert len(half) == sum(-(-n // 2) for n in summary["images"]["train"].values())
    assert set(half) <= {p.name for p in paths}
    # rerunning with the same settings keeps the folder; other settings rebuild it
    before = (out / ".prepared.json").stat().st_mtime_ns
    write_image_folder(toy, out, percents=(10, 50))
    assert (out / ".prepared.json").stat().st_mtime_ns == before
    write_image_folder(toy, out, percents=(1,))
    assert sorted(p.name for p in (out / "subsets").iterdir()) == ["1percent.txt"]


def test_a_folder_that_is_not_a_toy_dataset_is_refused(tmp_path, capsys):
    assert main(["data", "toy-folder", "--toy-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is not a toyscenes dataset" in capsys.readouterr().err and not (tmp_path / "o").exists()
