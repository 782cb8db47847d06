import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cribo.data import toyscenes
from cribo.data.toyscenes import CLASS_NAMES, IGNORE_INDEX, OBJECT_CLASSES, STUFF_CLASSES, generate

NUM_STUFF = len(STUFF_CLASSES)
SMALL = {"num_train": 12, "num_val": 4, "image_size": 64, "seed": 3}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("t") / "toy", **SMALL, workers=1, progress=False)


def _labels(root, image_id):
    return np.array(Image.open(root / "SegmentationClass" / f"{image_id}.png"))


def _ids(root, name):
    return (root / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()


def _instances_by_image(root, split):
    coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
    out = {}
    for img in coco.loadImgs(coco.getImgIds()):
        image_id = img["file_name"].removeprefix("JPEGImages/").removesuffix(".jpg")
        out[image_id] = (img, coco.loadAnns(coco.getAnnIds(imgIds=img["id"])), coco)
    return out


def test_class_constants():
    assert len(STUFF_CLASSES) == 3 and len(OBJECT_CLASSES) == 6 and CLASS_NAMES == STUFF_CLASSES + OBJECT_CLASSES
    assert len(set(CLASS_NAMES)) == 9 and IGNORE_INDEX == 255


def test_voc_layout_and_label_values(toy):
    train, val = _ids(toy, "train"), _ids(toy, "val")
    assert train == [f"train_{i:06d}" for i in range(12)] and val == [f"val_{i:06d}" for i in range(4)]
    assert _ids(toy, "trainaug") == train
    assert {p.stem for p in (toy / "JPEGImages").iterdir()} == set(train + val)
    assert {p.stem for p in (toy / "SegmentationClass").iterdir()} == set(train + val)
    for image_id in train + val:
        img = Image.open(toy / "JPEGImages" / f"{image_id}.jpg")
        png = Image.open(toy / "SegmentationClass" / f"{image_id}.png")
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
        assert png.format == "PNG" and png.mode == "P" and png.size == (64, 64)
        values = set(np.unique(np.array(png)).tolist())
        assert values <= set(range(len(CLASS_NAMES))) | {255}
        assert len({v for v in values if NUM_STUFF <= v < 255}) >= 2, image_id
        assert any(v < NUM_STUFF for v in values), image_id
    palette = Image.open(toy / "SegmentationClass" / "train_000000.png").getpalette()
    assert palette[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]  # VOC colour map
    assert palette[255 * 3: 256 * 3] == [255, 255, 255]
    meta = json.loads((toy / "meta.json").read_text())
    assert meta["name"] == "toyscenes" and meta["classes"] == list(CLASS_NAMES) and meta["num_classes"] == 9
    assert meta["ignore_index"] == 255 and meta["generator_version"] == toyscenes.GENERATOR_VERSION
    assert {k: meta[k] for k in SMALL} == SMALL


def test_void_label_is_exactly_the_inner_outline_of_objects(toy):
    for image_id, (img, anns, coco) in _instances_by_image(toy, "train").items():
        labels = _labels(toy, image_id)
        owner = np.full(labels.shape, -1)
        for k, ann in enumerate(anns):
            owner[coco.annToMask(ann).astype(bool)] = k
        padded = np.pad(owner, 1, mode="edge")
        h, w = owner.shape
        outline = np.zeros(owner.shape, bool)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            outline |= padded[dy:dy + h, dx:dx + w] != owner
        # objects of one image have distinct classes, so a change of owner is a change of label
        # except between two stuff regions, which carry no void band
        expected = outline & (owner >= 0)
        assert np.array_equal(labels == 255, expected), image_id
        assert (labels == 255).any(), image_id


def test_coco_instances_agree_with_the_semantic_masks(toy):
    data = json.loads((toy / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in data["categories"]] == list(range(NUM_STUFF, NUM_STUFF + 6))
    assert [c["name"] for c in data["categories"]] == list(OBJECT_CLASSES)
    assert all(c["supercategory"] == "object" for c in data["categories"])
    for split, count in (("train", 12), ("val", 4)):
        per_image = _instances_by_image(toy, split)
        assert len(per_image) == count
        for image_id, (img, anns, coco) in per_image.items():
            assert (toy / img["file_name"]).is_file() and (img["width"], img["height"]) == (64, 64)
            labels = _labels(toy, image_id)
            assert len(anns) >= 2 and len({a["category_id"] for a in anns}) == len(anns)
            union = np.zeros(labels.shape, bool)
            for ann in anns:
                assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
                inst = coco.annToMask(ann).astype(bool)
                assert inst.sum() == ann["area"] > 0
                assert mask_utils.toBbox(ann["segmentation"]).tolist() == ann["bbox"]
                inside = labels[inst]
                assert np.all((inside == ann["category_id"]) | (inside == 255))
                assert (inside == ann["category_id"]).any()
                assert not (union & inst).any()
                union |= inst
            # every object pixel of the semantic mask belongs to exactly one instance
            assert np.array_equal(union, labels >= NUM_STUFF)


def test_deterministic_and_independent_of_workers(tmp_path):
    args = {"num_train": 6, "num_val": 2, "image_size": 48, "progress": False}
    a = generate(tmp_path / "a", seed=1, workers=1, **args)
    b = generate(tmp_path / "b", seed=1, workers=2, **args)
    c = generate(tmp_path / "c", seed=2, workers=1, **args)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files) == 2 * 8 + 3 + 2 + 1
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    jpegs = [f for f in files if f.suffix == ".jpg"]
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in jpegs)


def test_colour_does_not_reveal_the_object_class(tmp_path):
    root = generate(tmp_path / "col", num_train=80, num_val=1, image_size=64, seed=0, workers=2, progress=False)
    coco = COCO(str(root / "annotations" / "instances_train.json"))
    feats, classes = [], []
    for ann in coco.loadAnns(coco.getAnnIds()):
        info = coco.loadImgs(ann["image_id"])[0]
        img = np.asarray(Image.open(root / info["file_name"]), dtype=np.float64)
        feats.append(img[coco.annToMask(ann).astype(bool)].mean(axis=0))
        classes.append(ann["category_id"])
    feats, classes = np.array(feats), np.array(classes)
    half = len(feats) // 2
    labels = np.unique(classes)
    assert len(labels) == 6 and len(feats) >= 150
    centroids = np.array([feats[:half][classes[:half] == c].mean(axis=0) for c in labels])
    pred = labels[np.argmin(((feats[half:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    accuracy = (pred == classes[half:]).mean()
    # Every class draws its colours from the same palette and mixes them alike, so a classifier on
    # the mean colour of an instance should be at chance, 1/6 = 0.17 (0.17-0.18 measured on 2000
    # images). The ~90 test instances here give a standard error of ~0.04, so 0.4 is over five
    # errors above chance: it fails only if colour really carries the class, while shape and
    # texture identify every instance.
    assert accuracy < 0.4


def test_idempotent_and_refuses_other_settings(tmp_path):
    root = generate(tmp_path / "i", num_train=2, num_val=1, image_size=32, workers=1, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate(root, num_train=2, num_val=1, image_size=32, workers=1, progress=False) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    with pytest.raises(FileExistsError, match=r"num_train \(existing 2, requested 3\)") as err:
        generate(root, num_train=3, num_val=1, image_size=32, workers=1, progress=False)
    assert str(root) in str(err.value)
    with pytest.raises(FileExistsError, match="seed"):
        generate(root, num_train=2, num_val=1, image_size=32, seed=5, workers=1, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError, match="no toyscenes dataset"):
        generate(other, num_train=2, num_val=1, image_size=32, workers=1, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty placeholder folder is filled, not refused
    assert (generate(empty, num_train=2, num_val=1, image_size=32, workers=1, progress=False) / "meta.json").is_file()


@pytest.mark.parametrize("kwargs, name", [
    ({"num_train": 0}, "num_train"), ({"num_val": 0}, "num_val"), ({"image_size": 8}, "image_size"),
    ({"image_size": 2048}, "image_size"), ({"workers": 0}, "workers"), ({"seed": -1}, "seed"),
    ({"num_train": 2.5}, "num_train"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=rf"{name} must be an integer in \[") as err:
        generate(tmp_path / "bad", **kwargs)
    if name == "image_size":
        assert "[32, 1024]" in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_a_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(toyscenes, "_write_coco", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(tmp_path / "crash", num_train=2, num_val=1, image_size=32, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []
