"""Feature extraction: a frozen backbone's patch tokens of one dataset split, stored on disk.

A feature store is a folder holding::

    features.npy      I x N x D float16   last-layer patch tokens, N = h*w in row-major grid order
    label_counts.npy  I x N x C uint16    per patch, pixels of each class (ignored pixels not counted)
    masks.npy         I x S x S uint8     ground truth resized (nearest) to the evaluation size S
    meta.json         dataset, split, ids, grid, sizes, checkpoint sha256, provenance

It is written under a temporary name and renamed when complete, so an interrupted extraction never
leaves a store that looks finished. Every evaluation reads stores instead of re-running the
backbone, which is why the DAG has one extraction per (checkpoint, dataset, split, size).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cribo.config import provenance
from cribo.data.registry import DatasetSpec
from cribo.data.segmentation import ResizePair, VOCLayoutSegmentation
from cribo.eval.incontext import patch_label_counts
from cribo.models.backbones import PatchFeatureExtractor


@dataclass
class FeatureStore:
    features: np.ndarray  # I x N x D float16
    label_counts: np.ndarray  # I x N x C uint16
    masks: np.ndarray  # I x S x S uint8
    meta: dict

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])


def check_image_size(image_size: int, patch_size: int) -> None:
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the backbone's patch size "
                         f"{patch_size}; pick e.g. {image_size // patch_size * patch_size}")


@torch.no_grad()
def extract_split(backbone: PatchFeatureExtractor, spec: DatasetSpec, root: str | Path, split: str,
                  image_size: int, batch_size: int = 32, device: str | torch.device = "cpu",
                  num_workers: int = 0, ids: list[str] | None = None, progress: bool = True) -> FeatureStore:
    """Patch features, per-patch label counts and resized masks of every image of a split."""
    check_image_size(image_size, backbone.patch_size)
    dataset = VOCLayoutSegmentation(root, split, transform=ResizePair(image_size), ids=ids)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    grid = image_size // backbone.patch_size
    n_img = len(dataset)
    features = np.empty((n_img, grid * grid, backbone.embed_dim), dtype=np.float16)
    counts = np.empty((n_img, grid * grid, spec.num_classes), dtype=np.uint16)
    masks = np.empty((n_img, image_size, image_size), dtype=np.uint8)
    backbone = backbone.to(device).eval()
    start = 0
    for images, batch_masks in tqdm(loader, desc=f"extract {spec.name}/{split}", disable=not progress,
                                    file=sys.stdout, mininterval=5):
        end = start + images.shape[0]
        feats = backbone(images.to(device)).float()
        features[start:end] = feats.reshape(images.shape[0], grid * grid, -1).cpu().numpy()
        masks[start:end] = batch_masks.numpy()
        counts[start:end] = patch_label_counts(batch_masks.numpy(), backbone.patch_size,
                                               spec.num_classes, spec.ignore_index)
        start = end
    meta = {
        "dataset": spec.name, "split": split, "root": str(root), "ids": dataset.ids,
        "image_size": image_size, "patch_size": backbone.patch_size, "grid": [grid, grid],
        "embed_dim": backbone.embed_dim, "num_classes": spec.num_classes,
        "ignore_index": spec.ignore_index, "class_names": list(spec.class_names),
    }
    return FeatureStore(features, counts, masks, meta)


def write_store(store: FeatureStore, out_dir: str | Path, extra_meta: dict | None = None) -> Path:
    """Write a store atomically: into ``<out_dir>.tmp-<pid>``, then rename over ``out_dir``."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "features.npy", store.features)
        np.save(tmp / "label_counts.npy", store.label_counts)
        np.save(tmp / "masks.npy", store.masks)
        meta = {**store.meta, **(extra_meta or {}), "provenance": provenance()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def load_store(path: str | Path) -> FeatureStore:
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a feature store (no meta.json); run `cribo extract` first")
    meta = json.loads(meta_path.read_text())
    load = lambda name: np.load(path / name, mmap_mode="r")  # noqa: E731
    return FeatureStore(load("features.npy"), load("label_counts.npy"), load("masks.npy"), meta)
