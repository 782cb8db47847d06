import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools import mask as mask_utils

from cribo.data.toyscenes import CLASS_NAMES, STUFF_CLASSES, generate


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("t") / "toy", num_train=12, num_val=4, image_size=64, seed=3,
                    workers=1, progress=False)


def _mask(root, image_id):
    return np.array(Image.open(root / "SegmentationClass" / f"{image_id}.png"))


def test_voc_layout_and_label_values(toy):
    lists = {s: (toy / "ImageSets/Segmentation" / f"{s}.txt").read_text().split() for s in ("train", "trainaug", "val")}
    assert len(lists["train"]) == 12 and lists["trainaug"] == lists["train"] and len(lists["val"]) == 4
    num_stuff = len(STUFF_CLASSES)
    for image_id in lists["train"] + lists["val"]:
        img = Image.open(toy / "JPEGImages" / f"{image_id}.jpg")
        png = Image.open(toy / "SegmentationClass" / f"{image_id}.png")
        assert img.mode == "RGB" and img.size == (64, 64) and png.mode == "P" and png.size == (64, 64)
        labels = np.array(png)
        values = set(np.unique(labels).tolist())
        assert values <= set(range(len(CLASS_NAMES))) | {255}
        assert len({v for v in values if num_stuff <= v < 255}) >= 1 and any(v < num_stuff for v in values)
        # every void pixel touches an object pixel or another void pixel (it is a border band)
        obj = (labels >= num_stuff) & (labels != 255)
        near = np.zeros_like(obj)
        for axis in (0, 1):
            for shift in (1, -1):
                near |= np.roll(obj | (labels == 255), shift, axis=axis)
        assert near[labels == 255].all()
    meta = json.loads((toy / "meta.json").read_text())
    assert meta["num_classes"] == len(CLASS_NAMES) and meta["classes"] == list(CLASS_NAMES)


def test_coco_instances_agree_with_the_semantic_masks(toy):
    coco = COCO(str(toy / "annotations" / "instances_train.json"))
    assert len(coco.getImgIds()) == 12 and len(coco.getAnnIds()) >= 12
    for ann in coco.loadAnns(coco.getAnnIds()):
        info = coco.loadImgs(ann["image_id"])[0]
        labels = _mask(toy, os.path.splitext(os.path.basename(info["file_name"]))[0])
        inst = coco.annToMask(ann).astype(bool)
        assert inst.sum() == ann["area"]
        inside = labels[inst]
        # apart from the void border band, the instance's pixels carry its class
        assert np.all((inside == ann["category_id"]) | (inside == 255))
        if ann["area"] >= 100:  # the one-pixel border band is a large share of tiny instances only
            assert (inside == ann["category_id"]).mean() > 0.5
        assert mask_utils.toBbox(ann["segmentation"]).tolist() == ann["bbox"]


def test_deterministic_and_independent_of_workers(tmp_path):
    a = generate(tmp_path / "a", num_train=6, num_val=2, image_size=48, seed=1, workers=1, progress=False)
    b = generate(tmp_path / "b", num_train=6, num_val=2, image_size=48, seed=1, workers=2, progress=False)
    c = generate(tmp_path / "c", num_train=6, num_val=2, image_size=48, seed=2, workers=1, progress=False)
    for name in ("JPEGImages/train_000003.jpg", "SegmentationClass/val_000001.png", "annotations/instances_train.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "JPEGImages/train_000003.jpg").read_bytes() != (c / "JPEGImages/train_000003.jpg").read_bytes()


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
    centroids = np.array([feats[:half][classes[:half] == c].mean(axis=0) for c in labels])
    pred = labels[np.argmin(((feats[half:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    accuracy = (pred == classes[half:]).mean()
    # Colours come from one palette for every class, so a mean-colour classifier is near chance
    # (1/6). Textures of two colours shift the mean colour only mildly; 0.4 leaves room for that
    # and for sampling noise of ~100 test instances, and is far below what shape gives.
    assert accuracy < 0.4


def test_idempotent_refuses_other_settings_and_validates(tmp_path):
    root = generate(tmp_path / "i", num_train=2, num_val=1, image_size=32, workers=1, progress=False)
    mtime = (root / "meta.json").stat().st_mtime_ns
    assert generate(root, num_train=2, num_val=1, image_size=32, workers=1, progress=False) == root
    assert (root / "meta.json").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="num_train=2"):
        generate(root, num_train=3, num_val=1, image_size=32, workers=1, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path / "bad", image_size=8)
    with pytest.raises(ValueError, match="num_val"):
        generate(tmp_path / "bad", num_val=0)
    assert not (tmp_path / "bad").exists()
