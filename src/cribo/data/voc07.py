"""Image-level multi-label classification data: Pascal VOC 2007 (the SVM benchmark) and labels
derived from segmentation masks (the toy scenes).

VOC 2007 is prepared from its two archives (``VOCtrainval_06-Nov-2007.tar``, ``VOCtest_06-Nov-2007.tar``,
each extracted into ``RAW/voc2007_trainval/`` and ``RAW/voc2007_test/``) into::

    OUT/JPEGImages/<id>.jpg              links to the extracted images (trainval and test ids are disjoint)
    OUT/ImageSets/Main/{trainval,test}.txt
    OUT/labels/{trainval,test}.npy        I x 20 int8: 1 present, 0 only difficult objects, -1 absent
    OUT/meta.json                         the 20 class names
    OUT/.prepared.json                    written last (completion marker)

The labels come from ``Annotations/<id>.xml``: an image is positive for a class when it holds a
non-difficult object of it, 0 ("difficult") when all its objects of that class are difficult, and
negative otherwise; the same convention as the devkit's ``<class>_<split>.txt`` files. The SVM
protocol counts 0 as negative in training and ignores it at test.

For a segmentation dataset (the toy scenes), an image is positive for every class present in its
mask (ignored pixels left out) and negative for the others; there are no difficult labels. VOC's
"background" class is not a label.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cribo.data.registry import VOC_CLASSES
from cribo.data.segmentation import DataError

VOC07_CLASSES = VOC_CLASSES[1:]  # the 20 object classes, in the devkit's order
SPLITS = ("trainval", "test")


@dataclass
class MultiLabelSet:
    """Images of one split and their labels ``I x C`` (int8 in {1, 0, -1})."""

    ids: list[str]
    image_paths: list[Path]
    labels: np.ndarray
    class_names: tuple[str, ...]


def annotation_objects(xml_path: Path) -> list[tuple[str, bool]]:
    """``(class name, difficult)`` of every object of a VOC annotation file."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DataError(f"{xml_path}: not a readable VOC annotation ({err}); re-extract VOCtrainval/VOCtest_06-Nov-2007.tar")
    objects = []
    for obj in root.iter("object"):
        name, difficult = obj.findtext("name"), obj.findtext("difficult")
        if name is None or difficult is None:
            raise DataError(f"{xml_path}: an object without a <name> or <difficult> flag; the VOC 2007 SVM protocol "
                            "needs the difficult flags (use the official VOC2007 annotations)")
        objects.append((name.strip(), difficult.strip() == "1"))
    return objects


def image_labels(objects: list[tuple[str, bool]], class_names=VOC07_CLASSES) -> np.ndarray:
    """``C`` int8 labels of one image: 1 if a non-difficult object of the class, 0 if only difficult ones, else -1."""
    labels = np.full(len(class_names), -1, np.int8)
    index = {name: i for i, name in enumerate(class_names)}
    for name, difficult in objects:
        if name not in index:
            raise DataError(f"unknown VOC class {name!r} in an annotation; known: {', '.join(class_names)}")
        i = index[name]
        labels[i] = max(labels[i], 0 if difficult else 1)
    return labels


def prepare_voc2007(raw: Path, out: Path, workers: int = 1, progress: bool = True) -> dict:
    """Prepare VOC 2007 trainval + test for the SVM protocol (see the module docstring)."""
    from cribo.data.prepare import _finish, _link, _need, _write_text

    started = time.time()
    counts = {}
    out.mkdir(parents=True, exist_ok=True)
    for split, archive in (("trainval", "voc2007_trainval"), ("test", "voc2007_test")):
        voc = _need(raw / archive / "VOCdevkit" / "VOC2007", f"VOC 2007 {split} folder")
        split_file = voc / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DataError(f"split list {split_file} is missing: the VOC 2007 {split} archive is incomplete; "
                            f"download it again (`cribo data download voc2007`)")
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        labels = np.stack([image_labels(annotation_objects(_need(voc / "Annotations" / f"{i}.xml", "annotation")))
                           for i in ids]) if ids else np.zeros((0, len(VOC07_CLASSES)), np.int8)
        for image_id in ids:
            _link(_need(voc / "JPEGImages" / f"{image_id}.jpg", "image"), out / "JPEGImages" / f"{image_id}.jpg")
        _write_text(out / "ImageSets" / "Main" / f"{split}.txt", "\n".join(ids) + "\n")
        (out / "labels").mkdir(exist_ok=True)
        tmp = out / "labels" / f".{split}.tmp.npy"
        np.save(tmp, labels)
        tmp.replace(out / "labels" / f"{split}.npy")
        counts[split] = len(ids)
    _write_text(out / "meta.json", json.dumps({"classes": list(VOC07_CLASSES)}, indent=1) + "\n")
    return _finish(out, started, **counts)


def load_voc2007(root: str | Path, split: str) -> MultiLabelSet:
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"VOC 2007 classification has splits {', '.join(SPLITS)}, not {split!r}")
    labels_path = root / "labels" / f"{split}.npy"
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not labels_path.is_file() or not split_file.is_file():
        raise DataError(f"{root} is not a prepared VOC 2007 folder ({labels_path} or {split_file} missing); "
                        f"run `cribo data download voc2007 && cribo data prepare voc2007 --out {root}`")
    ids = split_file.read_text().split()
    labels = np.load(labels_path)
    if labels.shape != (len(ids), len(VOC07_CLASSES)):
        raise DataError(f"{labels_path}: shape {labels.shape} does not match the {len(ids)} ids of {split_file}; "
                        "prepare again with --force")
    return MultiLabelSet(ids, [root / "JPEGImages" / f"{i}.jpg" for i in ids], labels, VOC07_CLASSES)


def labels_from_masks(spec, root: str | Path, split: str) -> MultiLabelSet:
    """Image-level labels of a segmentation dataset: 1 for every class present in the mask, else -1."""
    from cribo.data.segmentation import segmentation_dataset

    data = segmentation_dataset(spec, root, split)
    names = list(spec.class_names) or [str(c) for c in range(spec.num_classes)]
    keep = [c for c in range(spec.num_classes) if names[c] != "background"]
    labels = np.full((len(data), len(keep)), -1, np.int8)
    for i in range(len(data)):
        present = np.unique(np.asarray(data[i][1]))
        for j, c in enumerate(keep):
            if c in present:
                labels[i, j] = 1
    return MultiLabelSet(list(data.ids), [data.image_path(i) for i in range(len(data))], labels,
                         tuple(names[c] for c in keep))


def multilabel_set(spec, root: str | Path, split: str) -> MultiLabelSet:
    """The labelled images of ``split``: VOC 2007's annotations, or the classes in each mask."""
    if spec.name == "voc2007":
        return load_voc2007(root, split)
    return labels_from_masks(spec, root, split)
