"""Checks of the datasets users must obtain themselves (licence or login): ImageNet-1k, Cityscapes.

Nothing is downloaded; the tree the user points at is checked and every problem is listed with
what to do, so a cluster job does not die an hour in on a missing folder.

ImageNet-1k (the usual ``ImageFolder`` layout)::

    ROOT/train/<wnid>/*.JPEG    1,000 class folders, 1,281,167 images
    ROOT/val/<wnid>/*.JPEG      1,000 class folders, 50,000 images (val sorted into class folders)

Cityscapes (``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip`` extracted together)::

    ROOT/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png     2,975 / 500
    ROOT/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png
"""

from __future__ import annotations

import os
import re
from pathlib import Path

IMAGENET_CLASSES = 1000
IMAGENET_COUNTS = {"train": 1_281_167, "val": 50_000}
CITYSCAPES_COUNTS = {"train": 2975, "val": 500}
_WNID = re.compile(r"^n\d{8}$")


class MissingDataError(ValueError):
    """The user-provided tree is incomplete; the message lists every problem found."""


def _count_files(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for e in entries if e.is_file())


def check_imagenet(root: str | Path, expect_counts: bool = True) -> dict:
    """Check an ImageNet-1k tree; returns per-split class and image counts, raises listing problems.

    A class folder present in one split and absent from the other is named; with
    ``expect_counts`` the total image counts must match the official ones.
    """
    root = Path(root)
    problems: list[str] = []
    classes: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    if not root.is_dir():
        raise MissingDataError(f"ImageNet root not found: {root}; download ILSVRC2012 from image-net.org "
                               "(login) and point dataset.root / --root at the folder holding train/ and val/")
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            problems.append(f"{folder} is missing (expected {IMAGENET_CLASSES} class folders n########/)")
            continue
        names = {e.name for e in os.scandir(folder) if e.is_dir()}
        odd = sorted(n for n in names if not _WNID.match(n))
        if odd:
            problems.append(f"{folder} has folders that are not WordNet ids: {', '.join(odd[:5])}")
        classes[split] = {n for n in names if _WNID.match(n)}
        empty = sorted(n for n in classes[split] if _count_files(folder / n) == 0)
        if empty:
            problems.append(f"{folder}: empty class folders: {', '.join(empty[:10])}")
        counts[split] = sum(_count_files(folder / n) for n in classes[split])
        if len(classes[split]) != IMAGENET_CLASSES:
            problems.append(f"{folder} has {len(classes[split])} class folders, expected {IMAGENET_CLASSES}")
        elif expect_counts and counts[split] != IMAGENET_COUNTS[split]:
            problems.append(f"{folder} has {counts[split]:,} images, expected {IMAGENET_COUNTS[split]:,}")
    if len(classes) == 2:
        for a, b in (("train", "val"), ("val", "train")):
            missing = sorted(classes[a] - classes[b])
            if missing:
                problems.append(f"{root / b} lacks class folder(s) present in {a}/: {', '.join(missing[:10])}"
                                + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    if problems:
        raise MissingDataError("ImageNet tree incomplete:\n  - " + "\n  - ".join(problems)
                               + "\n(val must be sorted into class folders, e.g. with the devkit's ground truth)")
    return {split: {"classes": len(classes[split]), "images": counts[split]} for split in classes}


def check_cityscapes(root: str | Path, expect_counts: bool = True) -> dict:
    """Check a Cityscapes tree: every left image has its ``gtFine_labelIds`` mask and the counts match."""
    root = Path(root)
    problems: list[str] = []
    counts = {}
    for split, expected in CITYSCAPES_COUNTS.items():
        images_dir, masks_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        for folder, archive in ((images_dir, "leftImg8bit_trainvaltest.zip"), (masks_dir, "gtFine_trainvaltest.zip")):
            if not folder.is_dir():
                problems.append(f"{folder} is missing (extract {archive} from cityscapes-dataset.com into {root})")
        if not images_dir.is_dir() or not masks_dir.is_dir():
            continue
        images = {p.relative_to(images_dir).as_posix().removesuffix("_leftImg8bit.png")
                  for p in images_dir.glob("*/*_leftImg8bit.png")}
        masks = {p.relative_to(masks_dir).as_posix().removesuffix("_gtFine_labelIds.png")
                 for p in masks_dir.glob("*/*_gtFine_labelIds.png")}
        if images - masks:
            problems.append(f"{masks_dir}: no gtFine_labelIds mask for {len(images - masks)} image(s), "
                            f"e.g. {sorted(images - masks)[0]}")
        if expect_counts and len(images) != expected:
            problems.append(f"{images_dir} has {len(images)} images, expected {expected}")
        counts[split] = len(images)
    if problems:
        raise MissingDataError("Cityscapes tree incomplete:\n  - " + "\n  - ".join(problems))
    return counts
