"""Shared fixtures: a tiny dataset in the Pascal VOC layout, written by hand (no generator)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


def write_voc(root: Path, ids_by_split: dict[str, list[str]], size: int = 32, num_classes: int = 3, seed: int = 0):
    """Images whose left half is class 1 (red) and right half class 2 (blue) on class 0 rows."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for split, ids in ids_by_split.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for image_id in ids:
            mask = np.zeros((size, size), np.uint8)
            mask[size // 4:, : size // 2] = 1
            mask[size // 4:, size // 2:] = 2
            mask[size // 4, :] = 255  # a void border line
            img = np.zeros((size, size, 3), np.uint8)
            img[mask == 1] = (220, 30, 30)
            img[mask == 2] = (30, 30, 220)
            img[mask == 0] = (30, 200, 30)
            img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            pal = Image.fromarray(mask, mode="L").convert("P")
            pal.save(root / "SegmentationClass" / f"{image_id}.png")
    return root


@pytest.fixture
def tiny_voc(tmp_path):
    return write_voc(tmp_path / "voc", {"train": [f"t{i}" for i in range(6)], "val": ["v0", "v1"]})
