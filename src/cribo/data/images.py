"""Unlabelled image sets for pretraining.

Pretraining reads only images: the ids of one split of a VOC-layout dataset (the toy scenes, or
any prepared dataset), or every image file under a folder. A corrupt image raises a
:class:`~cribo.data.segmentation.DataError` naming the file instead of killing a worker with a
bare PIL traceback.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from cribo.data.segmentation import DataError, load_rgb, read_split

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def list_pretrain_images(root: str | Path, split: str | None) -> list[Path]:
    """Image paths of a VOC-layout split, or all images under ``root`` when it has no split lists."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    if (root / "ImageSets" / "Segmentation").is_dir() and split:
        return [root / "JPEGImages" / f"{i}.jpg" for i in read_split(root, split)]
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    return paths


class UnlabeledImages(Dataset):
    """``transform(PIL image)`` of each image path."""

    def __init__(self, paths: list[Path], transform=None):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_rgb(self.paths[index])
        return self.transform(image) if self.transform is not None else image
