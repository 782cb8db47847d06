"""From feature stores to one result row: training-set fractions, provenance, atomic JSON output.

Every evaluation writes exactly one JSON row (metrics plus everything needed to trust and group
it: dataset, split, fraction, seed, protocol settings, checkpoint sha256, config hash, git SHA,
wall time, peak memory). Tables are built from rows, never typed by hand.
"""

from __future__ import annotations

import datetime as dt
import json
import resource
import time
from pathlib import Path

import numpy as np

from cribo.config import atomic_write_text, git_sha, run_id, short_hash
from cribo.eval.features import FeatureStore
from cribo.eval.incontext import evaluate_incontext


def fraction_subset(num_images: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random ``fraction`` of ``num_images`` (at least one image)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(num_images)
    count = max(1, int(round(num_images * fraction)))
    return np.sort(np.random.default_rng(seed).choice(num_images, size=count, replace=False))


def run_incontext(train: FeatureStore, val: FeatureStore, *, fraction: float = 1.0, seed: int = 0,
                  k: int = 30, temperature: float = 0.02, memory_size: int | None = None,
                  train_ids: list[str] | None = None, index_kind: str = "exact", progress: bool = False,
                  protocol: str = "clean") -> dict:
    """In-context retrieval of ``val`` against a ``fraction`` of ``train``; returns metrics and settings.

    ``protocol="open-hbird"`` needs stores extracted with the same preprocessing (``cribo extract
    --protocol open-hbird``): its numbers depend on the input normalisation."""
    if train.meta["embed_dim"] != val.meta["embed_dim"] or train.meta["patch_size"] != val.meta["patch_size"]:
        raise ValueError("train and val feature stores come from different backbones")
    if train.meta["num_classes"] != val.meta["num_classes"]:
        raise ValueError("train and val feature stores have different class counts")
    for store in (train, val):
        made_with = store.meta.get("preprocessing", "clean")
        if made_with != ("open-hbird" if protocol == "open-hbird" else "clean"):
            raise ValueError(f"the {store.meta['split']} feature store was extracted with {made_with} preprocessing "
                             f"but --protocol {protocol} was asked; extract it again with "
                             f"`cribo extract --protocol {protocol}` (or evaluate without feature stores)")
    passes = int(train.meta.get("passes", 1))
    num_images = int(train.meta.get("num_images", train.features.shape[0] // passes))
    if train_ids is not None:  # a list file names the memory images
        position = {image_id: i for i, image_id in enumerate(train.meta["ids"])}
        missing = [i for i in train_ids if i not in position]
        if missing:
            raise ValueError(f"{len(missing)} ids of the training list are not in the {train.meta['split']} "
                             f"feature store (e.g. {missing[:3]}); was it extracted from another split?")
        images = np.sort(np.array([position[i] for i in train_ids], dtype=np.int64))
    else:
        images = fraction_subset(num_images, fraction, seed)
    # every augmented pass of the chosen images (rows are pass-major)
    subset = np.concatenate([p * num_images + images for p in range(passes)])
    metrics = evaluate_incontext(
        np.asarray(train.features[subset]), np.asarray(train.label_counts[subset]),
        np.asarray(val.features), np.asarray(val.masks), tuple(val.meta["grid"]), val.meta["num_classes"],
        k=k, temperature=temperature, memory_size=memory_size, seed=seed,
        ignore_index=val.meta["ignore_index"], index_kind=index_kind, progress=progress, protocol=protocol)
    settings = {"fraction": fraction, "seed": seed, "k": k, "temperature": temperature, "index": index_kind,
                "memory_size": memory_size, "image_size": val.meta["image_size"],
                "num_train_images": int(len(images)), "memory_passes": passes,
                "memory_augmented": bool(train.meta.get("augment", False)), "train_split": train.meta["split"]}
    return {**metrics, **settings}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pretrain_epochs(cfg: dict) -> int | None:
    if not cfg or cfg.get("method") in ("random", "pixels") or cfg.get("baseline"):
        return None
    epochs = (cfg.get("optim") or {}).get("epochs")
    return int(epochs) if epochs is not None else None


def make_row(protocol: str, result: dict, *, checkpoint: str | None, checkpoint_sha256: str | None,
             checkpoint_cfg: dict | None, dataset: str, split: str, class_names: list[str],
             experiment: str | None, run_name: str | None, started: float) -> dict:
    cfg = checkpoint_cfg or {}
    row = {
        "protocol": protocol,
        "experiment": experiment or "adhoc",
        "run_name": run_name or cfg.get("method", "unknown"),
        "run_id": run_id(cfg) if cfg else None,
        "method": cfg.get("method", "unknown"),
        "arch": cfg.get("model", {}).get("arch") if cfg.get("method") != "pixels" else "pixels",
        "patch_size": cfg.get("model", {}).get("patch_size"),
        # what the backbone was pretrained on (None for an untrained one), matched against paper tables
        "pretrain_data": (cfg.get("data") or {}).get("dataset") if cfg.get("method") != "random" else None,
        # pretraining epochs (None for an untrained or imported backbone, whose epochs we do not know)
        "pretrain_epochs": _pretrain_epochs(cfg),
        "dataset": dataset,
        "split": split,
        **result,
        "class_names": class_names,
        "checkpoint": checkpoint,
        "checkpoint_sha256": checkpoint_sha256,
        "config_hash": short_hash(cfg) if cfg else None,
        "eval_hash": short_hash({k: result.get(k) for k in ("fraction", "seed", "k", "temperature",
                                                             "memory_size", "image_size")}
                                | ({"protocol": result["incontext_protocol"]}
                                   if result.get("incontext_protocol", "clean") != "clean" else {})),
        "git_sha": git_sha(),
        "wall_time_s": round(time.time() - started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return row


def write_row(row: dict, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(row, indent=1) + "\n")
