"""The datasets the pipeline knows, by name: what each looks like on disk and where it comes from.

A :class:`DatasetSpec` says which layout its loader reads, how many classes its masks hold, which
label is ignored and which splits serve as the retrieval memory / training set (``train_split``)
and as queries / validation (``val_split``). An :class:`Archive` says where a file is downloaded
from, its checksum when one is published, and roughly how big it is (for the free-space check).
``PREPARED`` says which archives each prepared dataset needs.

Checksums: the md5 sums below are the ones published with the datasets (and used by torchvision
and others). COCO's stuff, panoptic and stuffthingmaps archives have none published; their first
download records its sha256 beside the file and later downloads are checked against it.

ImageNet-1k and Cityscapes need a licence or a login: they are never downloaded, the ``prepare``
stage checks the tree the user points at (:mod:`cribo.data.user_provided`). ImageNet serves
pretraining (an image folder); Cityscapes is checked but has no evaluation loader yet (its
PNG images and ``labelIds`` -> 19 train ids conversion are not implemented).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    layout: str  # "voc": JPEGImages/, SegmentationClass[Aug]/, ImageSets/Segmentation/<split>.txt; "ade": as distributed;
    # "voc07cls": image-level labels (cribo.data.voc07)
    num_classes: int
    ignore_index: int
    train_split: str
    val_split: str
    class_names: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Archive:
    name: str
    url: str
    filename: str
    approx_bytes: int  # for the free-space check (and twice that while extracting)
    md5: str | None = None


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# Pascal Context, 59 classes as mmsegmentation's PascalContextDataset59 (background ignored): the
# Detail API category ids of the 59 classes, whose sorted order is the class order, and the names
PASCAL_CONTEXT_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115, 144, 158,
    159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360,
    366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
PASCAL_CONTEXT_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood")

_GB = 1_000_000_000
ARCHIVES: dict[str, Archive] = {a.name: a for a in (
    Archive("voc2012", "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            "VOCtrainval_11-May-2012.tar", 2 * _GB, "6cd6e144f989b92b3379bac3b3de84fd"),
    Archive("sbd", "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
            "benchmark.tgz", int(1.45 * _GB), "82b4d87ceb2ed10f6038a1cba92111cb"),
    # VOC 2007 (classification: the SVM and low-shot benchmarks); the host torchvision also uses
    Archive("voc2007_trainval", "https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
            "VOCtrainval_06-Nov-2007.tar", int(0.46 * _GB), "c52e279531787c972589f7e41ab4ae64"),
    Archive("voc2007_test", "https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar",
            "VOCtest_06-Nov-2007.tar", int(0.46 * _GB), "b6e924de25625d8de591ea690078ad9f"),
    Archive("ade20k", "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
            "ADEChallengeData2016.zip", int(0.93 * _GB), "7328b3957e407ddae1d3cbf487f149ef"),
    Archive("coco_train2017", "http://images.cocodataset.org/zips/train2017.zip", "train2017.zip",
            int(18.9 * _GB), "cced6f7f71b7629ddf16f17bbcfab6b2"),
    Archive("coco_val2017", "http://images.cocodataset.org/zips/val2017.zip", "val2017.zip",
            int(0.82 * _GB), "442b8da7639aecaf257c1dceb8ba8c80"),
    # COCO instances (detection / instance segmentation): the md5 two independent COCO downloaders list
    # (they list the train2017 / val2017 md5 above as well)
    Archive("coco_annotations", "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
            "annotations_trainval2017.zip", int(0.25 * _GB), "f4bbac642086de4f52a3fdda2de5fa2c"),
    Archive("coco_stuff_annotations",
            "http://images.cocodataset.org/annotations/stuff_annotations_trainval2017.zip",
            "stuff_annotations_trainval2017.zip", int(1.2 * _GB)),
    Archive("coco_panoptic_annotations",
            "http://images.cocodataset.org/annotations/panoptic_annotations_trainval2017.zip",
            "panoptic_annotations_trainval2017.zip", int(0.9 * _GB)),
    # Pascal Context (mmseg's 59-class setting): the VOC2010 images (md5 as torchvision's VOC table
    # gives it) and the context annotations in the Detail API's JSON (the file mmseg's converter
    # reads; no published checksum: its sha256 is recorded at the first download)
    Archive("voc2010", "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
            "VOCtrainval_03-May-2010.tar", int(1.3 * _GB), "da459979d0c395079b5c75ee67908abb"),
    Archive("pascal_context_annotations", "https://codalabuser.blob.core.windows.net/public/trainval_merged.json",
            "trainval_merged.json", int(0.6 * _GB)),
    Archive("coco_stuffthingmaps",
            "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
            "stuffthingmaps_trainval2017.zip", int(0.7 * _GB)),
)}



@dataclass(frozen=True)
class SubsetList:
    """An official list of labelled ImageNet training images (the semi-supervised protocol)."""

    name: str
    url: str
    filename: str
    sha256: str
    num_bytes: int
    images: int


# The 1 % and 10 % ImageNet-1k subsets of SimCLR (Chen et al., 2020): one training file name per line,
# 1,000 classes in each. The de facto standard of the semi-supervised protocol (VISSL uses them as
# well). ORL's code base (OpenSelfSup) reads `train_labeled_{1,10}percent.txt` that it distributes from a
# Google Drive folder; those could not be compared with these here. The URLs pin SimCLR's commit
# 383d414 (2023-05-22); sha256, sizes and line counts were computed from the files at that commit.
_SIMCLR_SUBSETS = "https://raw.githubusercontent.com/google-research/simclr/383d4143fd8cf7879ae10f1046a9baeb753ff438"
IMAGENET_SUBSETS: dict[str, SubsetList] = {s.name: s for s in (
    SubsetList("1percent", f"{_SIMCLR_SUBSETS}/imagenet_subsets/1percent.txt", "imagenet_1percent.txt",
               "71e82a48ba78252683ae334c4d019ebd5c6e855b9599c1389fbe83eb9549cf17", 260_323, 12_811),
    SubsetList("10percent", f"{_SIMCLR_SUBSETS}/imagenet_subsets/10percent.txt", "imagenet_10percent.txt",
               "6d09de11e7bdaf5b1f3b1f249b6183695f97310cdd20f0c03e7235b6b9392091", 2_603_168, 128_116),
)}

_COCO_IMAGES = ("coco_train2017", "coco_val2017")
# prepared dataset -> archives it is built from
PREPARED: dict[str, tuple[str, ...]] = {
    "voc": ("voc2012", "sbd"),
    "voc2007": ("voc2007_trainval", "voc2007_test"),
    "ade20k": ("ade20k",),
    "coco-stuff15": (*_COCO_IMAGES, "coco_stuff_annotations"),
    "coco-things12": (*_COCO_IMAGES, "coco_panoptic_annotations"),
    "coco-stuff171": (*_COCO_IMAGES, "coco_stuffthingmaps"),
    "coco": _COCO_IMAGES,  # unlabelled images for pretraining
    "coco-instances": (*_COCO_IMAGES, "coco_annotations"),  # detection: images + instances_{train,val}2017.json
    "pascal-context": ("voc2010", "pascal_context_annotations"),
}
USER_PROVIDED = ("imagenet", "cityscapes")


def _coco_spec(name: str, num_classes: int) -> DatasetSpec:
    from cribo.data import coco

    names = {"coco-stuff15": coco.STUFF15_CLASSES, "coco-things12": coco.THINGS12_CLASSES}.get(name, ())
    return DatasetSpec(name, "voc", num_classes, 255, "train", "val", tuple(names))


_REGISTRY: dict[str, DatasetSpec] = {
    "toyscenes": DatasetSpec("toyscenes", "voc", 9, 255, "train", "val"),
    "voc": DatasetSpec("voc", "voc", 21, 255, "trainaug", "val", VOC_CLASSES),
    # image-level labels only (cribo.data.voc07): the SVM protocol's trainval / test
    "voc2007": DatasetSpec("voc2007", "voc07cls", 20, 255, "trainval", "test", VOC_CLASSES[1:]),
    # 151 labels with 0 = "other" ignored: the 150-class mean (Hummingbird / NeCo convention)
    "ade20k": DatasetSpec("ade20k", "ade", 151, 0, "training", "validation"),
    "coco-stuff15": _coco_spec("coco-stuff15", 15),
    "coco-things12": _coco_spec("coco-things12", 12),
    "coco-stuff171": _coco_spec("coco-stuff171", 171),
    "pascal-context": DatasetSpec("pascal-context", "voc", 59, 255, "train", "val", PASCAL_CONTEXT_CLASSES),
}


class UnknownDatasetError(ValueError):
    pass


def known_datasets() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str, root: str | Path | None = None) -> DatasetSpec:
    """Look a dataset up by name; class names the spec lacks are read from the prepared folder
    (toyscenes ``meta.json``, a prepared dataset's ``meta.json``, ADE20K's ``objectInfo150.csv``)."""
    if name not in _REGISTRY:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(known_datasets())}")
    spec = _REGISTRY[name]
    if root is None:
        return spec
    meta_path = Path(root) / "meta.json"
    if name == "toyscenes" and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return DatasetSpec(spec.name, spec.layout, int(meta["num_classes"]), int(meta["ignore_index"]),
                           spec.train_split, spec.val_split, tuple(meta["classes"]))
    if not spec.class_names and meta_path.is_file():
        classes = tuple(json.loads(meta_path.read_text()).get("classes", ()))
        if len(classes) == spec.num_classes:
            return DatasetSpec(**{**spec.__dict__, "class_names": classes})
    info = Path(root) / "objectInfo150.csv"
    if name == "ade20k" and info.is_file():
        with open(info, newline="") as f:
            names = [row["Name"].split(";")[0] for row in csv.DictReader(f)]
        if len(names) == 150:
            return DatasetSpec(**{**spec.__dict__, "class_names": ("other", *names)})
    return spec
