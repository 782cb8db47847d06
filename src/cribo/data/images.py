"""Unlabelled image sets for pretraining.

Pretraining reads only images: the ids of one split of a VOC-layout dataset (the toy scenes, or
any prepared dataset), or every image file under a folder, searched recursively: COCO's
``train2017/`` (``cribo data prepare coco`` links it as ``resources/coco/train2017``), ImageNet's
``train/`` (an ImageFolder: class folders of JPEGs; the labels are never read), or any folder. A corrupt image raises a
:class:`~cribo.data.segmentation.DataError` naming the file instead of killing a worker with a
bare PIL traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
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
    # os.walk follows symlinked folders (prepared datasets link train2017/ etc.), rglob does not
    paths = sorted(Path(folder) / name for folder, _, names in os.walk(root, followlinks=True)
                   for name in names if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    return paths


class UnlabeledImages(Dataset):
    """``transform(PIL image)`` of each image path.

    Indexed by ``i`` or by ``(i, seed)`` (what :class:`cribo.train.sampling.ResumableEpochSampler`
    yields): with a seed, the random transform runs under that seed in a forked RNG, so the result
    depends on neither the worker nor the caller's RNG state, which is left untouched.
    """

    def __init__(self, paths: list[Path], transform=None):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | tuple[int, int]):
        seed = None
        if isinstance(index, (tuple, list)):
            index, seed = index
        image = load_rgb(self.paths[index])
        if self.transform is None:
            return image
        if seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            # only the CPU generator: torch.manual_seed would also queue a CUDA seeding that records
            # a Python stack on every call (a few ms per sample, a fifth of the toy's loading time)
            torch.default_generator.manual_seed(seed)
            return self.transform(image)
