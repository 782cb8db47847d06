"""The toy scenes as an ImageNet-style classification set, so the classification protocols run on the toy.

Each toy image gets one label: the object class covering the most pixels of its mask (stuff classes
and the void border ignored; a tie goes to the lower class id). The images are linked (hard links,
or copies across file systems) into the ImageFolder layout :mod:`cribo.eval.classification` reads::

    OUT/train/<class>/<id>.jpg, OUT/val/<class>/<id>.jpg
    OUT/subsets/<n>percent.txt     per class, the first ceil(n % of its training images) by id
    OUT/.prepared.json             written last: the class counts and the settings (completion marker)

The subsets play the role of the 1 % / 10 % ImageNet lists for the semi-supervised protocol: a
fixed, class-balanced choice that does not depend on the machine. Everything is written under a
temporary sibling folder and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from cribo.config import atomic_directory

MARKER = ".prepared.json"


def dominant_object(mask: np.ndarray, first_object_class: int, ignore_index: int) -> int | None:
    """The object class id covering the most pixels of ``mask`` (``H x W`` class ids), or None."""
    ids = mask[(mask >= first_object_class) & (mask != ignore_index)]
    if ids.size == 0:
        return None
    counts = np.bincount(ids.astype(np.int64))
    return int(counts.argmax())  # argmax takes the first maximum: ties go to the lower id


def subset_ids(ids_by_class: dict[str, list[str]], percent: float) -> list[str]:
    """Per class, the first ``ceil(percent % x count)`` ids in sorted order (at least one per class)."""
    chosen = []
    for name in sorted(ids_by_class):
        ids = sorted(ids_by_class[name])
        chosen += ids[:max(1, math.ceil(len(ids) * percent / 100))]
    return chosen


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def write_image_folder(toy_root: str | Path, out: str | Path, percents=(1, 10)) -> dict:
    """Write the classification view of the toy dataset at ``toy_root`` into ``out``; returns the summary.

    An ``out`` already complete with the same source and settings is left as is.
    """
    toy_root, out = Path(toy_root), Path(out)
    meta_path = toy_root / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {toy_root} is not a toyscenes dataset "
                                "(generate it with `cribo data toyscenes`)")
    meta = json.loads(meta_path.read_text())
    settings = {"source": str(toy_root), "generator_version": meta.get("generator_version"),
                "percents": [float(p) for p in percents]}
    if (out / MARKER).is_file():
        done = json.loads((out / MARKER).read_text())
        if done.get("settings") == settings:
            return done
    first_object = len(meta["stuff_classes"])
    classes = meta["classes"]
    counts, skipped = {}, []
    with atomic_directory(out) as tmp:
        for split in ("train", "val"):
            ids = (toy_root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
            by_class: dict[str, list[str]] = {}
            for image_id in ids:
                mask = np.asarray(Image.open(toy_root / "SegmentationClass" / f"{image_id}.png"))
                label = dominant_object(mask, first_object, meta["ignore_index"])
                if label is None:
                    skipped.append(image_id)
                    continue
                folder = tmp / split / classes[label]
                folder.mkdir(parents=True, exist_ok=True)
                _link(toy_root / "JPEGImages" / f"{image_id}.jpg", folder / f"{image_id}.jpg")
                by_class.setdefault(classes[label], []).append(image_id)
            counts[split] = {name: len(v) for name, v in sorted(by_class.items())}
            if split == "train":
                (tmp / "subsets").mkdir()
                for p in percents:
                    names = [f"{i}.jpg" for i in subset_ids(by_class, p)]
                    (tmp / "subsets" / f"{p:g}percent.txt").write_text("\n".join(names) + "\n")
        missing = sorted(set(counts["train"]) ^ set(counts["val"]))
        if missing:
            raise ValueError(f"{toy_root}: class(es) {missing} have images in only one split; generate more images")
        summary = {"settings": settings, "classes": sorted(counts["train"]), "images": counts,
                   "images_without_an_object": skipped}
        (tmp / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
    return summary
