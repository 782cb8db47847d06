"""Image-level feature stores: one L2-normalised descriptor per image with its multi-label targets.

A store is a folder holding::

    features.npy   I x F float32   :func:`cribo.eval.svm.global_descriptor`, L2-normalised
    labels.npy     I x C int8      1 present, 0 difficult, -1 absent (:mod:`cribo.data.voc07`)
    meta.json      dataset, split, ids, class names, image size, descriptor, checkpoint

written under a temporary name and renamed (a store that exists is complete). The SVM and low-shot
evaluations read two stores (trainval and test) instead of re-running the backbone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cribo.config import atomic_directory, provenance
from cribo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD, load_rgb
from cribo.data.voc07 import MultiLabelSet
from cribo.eval.features import _prefetched
from cribo.eval.svm import global_descriptor, l2_normalise


class _SquashedImages(Dataset):
    """Images resized to ``size x size`` regardless of aspect ratio (the protocol's squash), normalised."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = load_rgb(self.paths[index]).resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std


@torch.no_grad()
def extract_global(backbone, images: MultiLabelSet, image_size: int, batch_size: int = 64, device="cpu",
                   num_workers: int = 0, progress: bool = True) -> np.ndarray:
    """``I x F`` L2-normalised descriptors of every image (float32)."""
    backbone = backbone.to(device).eval()
    loader = DataLoader(_SquashedImages(images.image_paths, image_size), batch_size=batch_size,
                        num_workers=num_workers)
    out = []
    # without worker processes, a thread decodes the next batches while the backbone runs
    batches = loader if num_workers > 0 else _prefetched(loader)
    for batch in tqdm(batches, total=len(loader), desc="extract global", disable=not progress, file=sys.stdout, mininterval=5):
        out.append(global_descriptor(backbone, batch.to(device)).float().cpu().numpy())
    return l2_normalise(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)


def write_global_store(out_dir: str | Path, features: np.ndarray, images: MultiLabelSet, meta: dict) -> Path:
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        np.save(tmp / "features.npy", features.astype(np.float32))
        np.save(tmp / "labels.npy", images.labels.astype(np.int8))
        full = {**meta, "ids": images.ids, "class_names": list(images.class_names),
                "feature_dim": int(features.shape[1]), "num_images": len(images.ids), "provenance": provenance()}
        (tmp / "meta.json").write_text(json.dumps(full, indent=1))
    return out_dir


def load_global_store(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(features I x F, labels I x C, meta)`` of a store written by :func:`write_global_store`."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path} is not an image-level feature store (no meta.json); "
                                "run `cribo extract-global` first")
    meta = json.loads((path / "meta.json").read_text())
    return np.load(path / "features.npy"), np.load(path / "labels.npy"), meta
