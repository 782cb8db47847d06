"""Feature extraction: a frozen backbone's patch tokens of one dataset split, stored on disk.

A feature store is a folder holding::

    features.npy      I x N x D float16   the backbone's spatial map (ViT: last-layer patch tokens; ResNet:
                                          res5), N = h*w in row-major grid order
    label_counts.npy  I x N x C uint16    per patch, pixels of each class (ignored pixels not counted)
    masks.npy         I x S x S uint8     ground truth resized (nearest) to the evaluation size S
    meta.json         dataset, split, ids, grid, sizes, checkpoint sha256, provenance

Rows are pass-major: with ``passes`` > 1 (the in-context memory is built from 2 augmented passes
over the training images) row ``p * I + i`` is image ``i`` in pass ``p``. Extraction runs shard by
shard into ``<store>.partial/`` (each shard written atomically, so a killed extraction resumes
where it stopped), then the shards are assembled under a temporary name and renamed: a store that
exists is complete. Decoding and label counting overlap the forward pass (a prefetch thread, or
DataLoader workers). Every evaluation reads stores instead of re-running the backbone, which is
why the DAG has one extraction per (checkpoint, dataset, split, size, passes).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from cribo.config import atomic_directory, provenance
from cribo.data.registry import DatasetSpec
from cribo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD, ResizePair, segmentation_dataset
from cribo.eval.incontext import patch_label_counts
from cribo.models.backbones import PatchFeatureExtractor
from cribo.train.sampling import sample_seed


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


# How images become network inputs. "clean": bicubic resize, ImageNet statistics. "open-hbird":
# what open-hummingbird-eval does (torchvision's bilinear resize, masks by torch's nearest; its
# std 0.255 for the blue channel, a typo of ImageNet's 0.225 that its published numbers carry).
PREPROCESSING = {
    "clean": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resample": Image.BICUBIC},
    "open-hbird": {"mean": IMAGENET_MEAN, "std": (0.229, 0.224, 0.255), "resample": Image.BILINEAR,
                   "torch_nearest_mask": True},
}


def _resize_pair(size: int, preprocessing: str) -> ResizePair:
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {', '.join(PREPROCESSING)}, got {preprocessing!r}")
    return ResizePair(size, **PREPROCESSING[preprocessing])


class MemoryAugmentation:
    """The Hummingbird memory augmentation of an (image, mask) pair, then :class:`ResizePair`.

    Colour jitter on the image only (brightness, contrast, saturation and hue 0.1, each applied
    independently with probability 0.5) and one random resized crop applied to both (scale
    0.5-2.0 of the area, capped by torchvision at the whole image; ratio 3/4-4/3; bilinear for the
    image, nearest for the mask), as open-hummingbird-eval does. Random draws come from the global
    torch RNG, which the caller seeds per sample.
    """

    def __init__(self, size: int, preprocessing: str = "clean"):
        from torchvision.transforms import v2

        self.resize = _resize_pair(size, preprocessing)
        self.jitter = [v2.RandomApply([t], p=0.5) for t in (
            v2.ColorJitter(brightness=0.1), v2.ColorJitter(contrast=0.1), v2.ColorJitter(saturation=0.1),
            v2.ColorJitter(hue=0.1))]
        self.crop = v2.RandomResizedCrop(size, scale=(0.5, 2.0), ratio=(3 / 4, 4 / 3))

    def __call__(self, image, mask: np.ndarray):
        for jitter in self.jitter:
            image = jitter(image)
        top, left, height, width = _crop_box(self.crop, image)
        image = image.crop((left, top, left + width, top + height))
        mask = mask[top:top + height, left:left + width]
        return self.resize(image, np.ascontiguousarray(mask))


def _crop_box(crop, image) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a RandomResizedCrop box for a PIL image."""
    from torchvision.transforms import RandomResizedCrop

    return RandomResizedCrop.get_params(image, scale=list(crop.scale), ratio=list(crop.ratio))


class _PassesDataset(Dataset):
    """Item ``p * I + i``: image ``i`` of the split in pass ``p``, resized (and augmented if asked),
    with its resized mask and per-patch label counts (computed here, off the forward's critical path)."""

    def __init__(self, base, spec: DatasetSpec, image_size: int, patch_size: int,
                 passes: int, augment: bool, seed: int, preprocessing: str = "clean"):
        self.base, self.spec, self.patch_size = base, spec, patch_size
        self.passes, self.augment, self.seed, self.preprocessing = passes, augment, seed, preprocessing
        self.resize = _resize_pair(image_size, preprocessing)
        self.augmentation = MemoryAugmentation(image_size, preprocessing) if augment else None

    def __len__(self) -> int:
        return self.passes * len(self.base)

    def __getitem__(self, item: int):
        pass_index, index = divmod(item, len(self.base))
        image, mask = self.base[index]
        if self.augmentation is None:
            x, m = self.resize(image, mask)
        else:  # seeded per (pass, image): resumable and independent of workers
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, pass_index, index))
                x, m = self.augmentation(image, mask)
        return x, m

    def collate(self, items):
        """Stack a batch and count its patch labels in one vectorised pass (in the loading thread)."""
        images = torch.stack([x for x, _ in items])
        masks = torch.stack([m for _, m in items])
        counts = patch_label_counts(masks.numpy(), self.patch_size, self.spec.num_classes, self.spec.ignore_index)
        return images, masks, counts


def _prefetched(loader: DataLoader, depth: int = 2):
    """Iterate ``loader`` in a background thread so decoding overlaps the forward pass (JPEG
    decoding, resizing and numpy release the GIL, as does the backbone)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def fill():
        try:
            for batch in loader:
                q.put(batch)
        except BaseException as err:  # re-raised in the consumer
            q.put(err)
        q.put(done)

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    while (batch := q.get()) is not done:
        if isinstance(batch, BaseException):
            raise batch
        yield batch
    thread.join()


@torch.no_grad()
def _extract_items(backbone: PatchFeatureExtractor, dataset: _PassesDataset, items: range, batch_size: int,
                   device, num_workers: int, on_batch=None):
    """Features (fp16), label counts (uint16) and masks (uint8) of dataset ``items``."""
    loader = DataLoader(Subset(dataset, list(items)), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=dataset.collate)
    feats, counts, masks = [], [], []
    batches = loader if num_workers > 0 else _prefetched(loader)
    for images, batch_masks, batch_counts in batches:
        out = backbone(images.to(device, non_blocking=True))
        feats.append(out.reshape(images.shape[0], -1, out.shape[-1]).to(torch.float16).cpu().numpy())
        counts.append(batch_counts)
        masks.append(batch_masks.numpy())
        if on_batch is not None:
            on_batch(images.shape[0])
    return np.concatenate(feats), np.concatenate(counts), np.concatenate(masks)


def _split_dataset(backbone, spec, root, split, image_size, passes, augment, seed, ids=None, preprocessing="clean"):
    check_image_size(image_size, backbone.patch_size)
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    base = segmentation_dataset(spec, root, split, transform=None, ids=ids)
    return _PassesDataset(base, spec, image_size, backbone.patch_size, passes, augment, seed, preprocessing)


def _store_meta(spec, root, split, dataset: _PassesDataset, image_size: int, backbone) -> dict:
    grid = image_size // backbone.patch_size
    return {
        "dataset": spec.name, "split": split, "root": str(root), "ids": dataset.base.ids,
        "image_size": image_size, "patch_size": backbone.patch_size, "grid": [grid, grid],
        # the map's stride in pixels (= patch size for a ViT, 32 for a ResNet's res5) and its layer
        "stride": backbone.patch_size, "feature_map": getattr(backbone, "feature_map", "tokens"),
        "backbone": type(backbone).__name__,
        "embed_dim": backbone.embed_dim, "num_classes": spec.num_classes,
        "ignore_index": spec.ignore_index, "class_names": list(spec.class_names),
        "passes": dataset.passes, "augment": dataset.augment, "augment_seed": dataset.seed,
        "num_images": len(dataset.base), "preprocessing": dataset.preprocessing,
    }


def extract_split(backbone: PatchFeatureExtractor, spec: DatasetSpec, root: str | Path, split: str,
                  image_size: int, batch_size: int = 32, device: str | torch.device = "cpu",
                  num_workers: int = 0, ids: list[str] | None = None, progress: bool = True,
                  passes: int = 1, augment: bool = False, seed: int = 0,
                  preprocessing: str = "clean") -> FeatureStore:
    """Patch features, per-patch label counts and resized masks of every image of a split, in memory.

    With ``passes > 1`` (and ``augment``) the split is traversed several times, each image augmented
    anew; rows are pass-major (pass ``p``, image ``i`` at ``p * I + i``). ``preprocessing``: a key of
    ``PREPROCESSING`` (``open-hbird`` for ``cribo eval incontext --protocol open-hbird``).
    """
    dataset = _split_dataset(backbone, spec, root, split, image_size, passes, augment, seed, ids, preprocessing)
    backbone = backbone.to(device).eval()
    with tqdm(total=len(dataset), desc=f"extract {spec.name}/{split}", disable=not progress, file=sys.stdout,
              mininterval=5, unit="img") as bar:
        feats, counts, masks = _extract_items(backbone, dataset, range(len(dataset)), batch_size, device,
                                              num_workers, on_batch=bar.update)
    return FeatureStore(feats, counts, masks, _store_meta(spec, root, split, dataset, image_size, backbone))


def extract_to_disk(backbone: PatchFeatureExtractor, spec: DatasetSpec, root: str | Path, split: str,
                    image_size: int, out_dir: str | Path, *, batch_size: int = 32,
                    device: str | torch.device = "cpu", num_workers: int = 0, passes: int = 1,
                    augment: bool = False, seed: int = 0, shard_images: int = 2048, progress: bool = True,
                    extra_meta: dict | None = None, preprocessing: str = "clean") -> Path:
    """Like :func:`extract_split`, written to ``out_dir`` shard by shard and resumable.

    Shards of ``shard_images`` images go to ``<out_dir>.partial/`` as they complete (each written
    atomically); a rerun with the same settings skips the finished shards. When all are done they
    are assembled into the store (memory-mapped, never all in RAM) and renamed to ``out_dir``.
    """
    out_dir = Path(out_dir)
    dataset = _split_dataset(backbone, spec, root, split, image_size, passes, augment, seed,
                             preprocessing=preprocessing)
    backbone = backbone.to(device).eval()
    meta = {**_store_meta(spec, root, split, dataset, image_size, backbone), **(extra_meta or {})}
    shard_images = max(batch_size, shard_images // batch_size * batch_size)
    partial = out_dir.with_name(out_dir.name + ".partial")
    plan = {"meta": meta, "shard_images": shard_images, "total": len(dataset)}
    plan_path = partial / "plan.json"
    if partial.exists() and (not plan_path.is_file() or json.loads(plan_path.read_text()) != plan):
        shutil.rmtree(partial)  # left by a run with other settings: not resumable
    partial.mkdir(parents=True, exist_ok=True)
    if not plan_path.is_file():
        plan_path.write_text(json.dumps(plan))
    shards = [range(s, min(s + shard_images, len(dataset))) for s in range(0, len(dataset), shard_images)]
    done = [i for i in range(len(shards)) if (partial / f"shard-{i:05d}.npz").is_file()]
    with tqdm(total=len(dataset), initial=sum(len(shards[i]) for i in done), desc=f"extract {spec.name}/{split}",
              disable=not progress, file=sys.stdout, mininterval=5, unit="img") as bar:
        for i, items in enumerate(shards):
            path = partial / f"shard-{i:05d}.npz"
            if path.is_file():
                continue
            feats, counts, masks = _extract_items(backbone, dataset, items, batch_size, device, num_workers,
                                                  on_batch=bar.update)
            tmp = partial / f".shard-{i:05d}.tmp-{os.getpid()}.npz"
            np.savez(tmp, features=feats, label_counts=counts, masks=masks)
            os.replace(tmp, path)
    _assemble(partial, shards, out_dir, meta, backbone.embed_dim, spec.num_classes, image_size)
    shutil.rmtree(partial)
    return out_dir


def _assemble(partial: Path, shards: list[range], out_dir: Path, meta: dict, dim: int, classes: int, size: int):
    total = shards[-1].stop if shards else 0
    n = total and np.load(partial / "shard-00000.npz")["features"].shape[1]
    with atomic_directory(out_dir) as tmp:
        arrays = {
            "features": np.lib.format.open_memmap(tmp / "features.npy", "w+", np.float16, (total, n, dim)),
            "label_counts": np.lib.format.open_memmap(tmp / "label_counts.npy", "w+", np.uint16, (total, n, classes)),
            "masks": np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (total, size, size)),
        }
        for i, items in enumerate(shards):
            with np.load(partial / f"shard-{i:05d}.npz") as shard:
                for name, array in arrays.items():
                    array[items.start:items.stop] = shard[name]
        for array in arrays.values():
            array.flush()
        del arrays
        (tmp / "meta.json").write_text(json.dumps({**meta, "provenance": provenance()}, indent=1))


def load_store(path: str | Path) -> FeatureStore:
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a feature store (no meta.json); run `cribo extract` first")
    meta = json.loads(meta_path.read_text())
    load = lambda name: np.load(path / name, mmap_mode="r")  # noqa: E731
    return FeatureStore(load("features.npy"), load("label_counts.npy"), load("masks.npy"), meta)


def check_store_checkpoint(store: FeatureStore, store_path: str | Path, checkpoint: str | Path,
                           checkpoint_sha256: str, option: str = "--val-features") -> None:
    """Refuse a feature store that was not extracted from ``checkpoint`` (compared by sha256).

    A row names the checkpoint it evaluates; features of another checkpoint would give that
    checkpoint another's numbers without any sign of it.
    """
    recorded = store.meta.get("checkpoint_sha256")
    if recorded is None:
        raise ValueError(f"{option} {store_path}: its meta.json does not record which checkpoint it was "
                         f"extracted from; extract it again with `cribo extract --checkpoint {checkpoint}`")
    if recorded != checkpoint_sha256:
        raise ValueError(f"{option} {store_path} was extracted from {store.meta.get('checkpoint', 'another file')} "
                         f"(sha256 {recorded[:12]}...), not from --checkpoint {checkpoint} (sha256 "
                         f"{checkpoint_sha256[:12]}...); pass the checkpoint the features came from, or extract "
                         "them again from this one")
