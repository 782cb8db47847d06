"""In-context scene understanding by dense nearest-neighbour retrieval (the Hummingbird protocol).

Balazevic et al. (NeurIPS 2023) evaluate dense features without training anything: a memory holds
patch features of labelled training images with their soft labels (each patch's class
histogram); every validation patch takes its k nearest memory entries by cosine similarity,
weights their labels by ``softmax(similarity / temperature)``, and the resulting soft label map is
bilinearly upsampled and arg-maxed. No library provides this protocol; open-hummingbird-eval is
the reference re-implementation, and we follow it with two deliberate departures:

- ignored pixels (label 255) are left out of the soft labels and fully-ignored patches are not put
  in the memory (open-hummingbird-eval remaps them to class 0, which is a real class for several
  datasets);
- the per-image memory budget is capped at the number of patches, where it crashes.

The search is faiss's exact inner product over L2-normalised features.
"""

from __future__ import annotations

import sys

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cribo.eval.metrics import ConfusionMeter


def patch_label_counts(masks, patch_size: int, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Pixels of each class in each patch: ``B x H x W`` labels -> ``B x (H/p * W/p) x C`` uint16.

    Patches are in row-major grid order, like ViT tokens; ignored pixels are not counted.
    """
    masks = np.asarray(masks)
    b, h, w = masks.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the patch size {patch_size}")
    labels = masks.astype(np.int64)
    valid = labels != ignore_index
    if (labels[valid] >= num_classes).any() or (labels[valid] < 0).any():
        bad = labels[valid][(labels[valid] >= num_classes) | (labels[valid] < 0)][0]
        raise ValueError(f"mask label {bad} is outside [0, {num_classes}) and is not the ignore label {ignore_index}")
    gh, gw = h // patch_size, w // patch_size
    patch_index = (np.arange(h)[:, None] // patch_size) * gw + (np.arange(w)[None, :] // patch_size)
    flat = (np.arange(b)[:, None, None] * (gh * gw) + patch_index[None]) * num_classes + labels
    counts = np.bincount(flat[valid], minlength=b * gh * gw * num_classes)
    return counts.reshape(b, gh * gw, num_classes).astype(np.uint16)


def rarity_scores(label_counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """open-hummingbird-eval's sampling score, ``I x N x C`` counts -> ``I x N``; lower is kept first.

    A patch scores the sum, over the classes present in it, of how many patches of its image
    contain that class: patches of classes rare in their image score low. Scores are multiplied by
    U(0, 1) noise; patches with no labelled pixel score +inf (kept last).
    """
    present = label_counts > 0  # I x N x C
    patches_per_class = present.sum(axis=1, keepdims=True)  # I x 1 x C
    scores = (present * patches_per_class).sum(axis=2).astype(np.float64)
    scores *= rng.random(scores.shape)
    scores[~present.any(axis=2)] = np.inf
    return scores


def select_memory(features: np.ndarray, label_counts: np.ndarray, memory_size: int | None,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Memory entries: ``I x N x D`` features, ``I x N x C`` counts -> ``M x D`` float16 unit vectors,
    ``M x C`` float32 soft labels, and the per-image budget (None when every patch is kept)."""
    num_images, num_patches, _ = features.shape
    labelled = label_counts.sum(axis=2) > 0  # I x N
    if memory_size is None:
        keep, budget = labelled, None
    else:
        budget = min(max(memory_size // num_images, 1), num_patches)
        order = np.argsort(rarity_scores(label_counts, rng), axis=1, kind="stable")[:, :budget]
        keep = np.zeros_like(labelled)
        np.put_along_axis(keep, order, True, axis=1)
        keep &= labelled
    feats = torch.from_numpy(np.ascontiguousarray(features[keep], dtype=np.float32))
    feats = F.normalize(feats, dim=1, eps=1e-6).to(torch.float16).numpy()
    counts = label_counts[keep].astype(np.float32)
    return feats, counts / counts.sum(axis=1, keepdims=True), budget


def retrieve_soft_labels(queries: np.ndarray, memory_features: np.ndarray, memory_labels: np.ndarray,
                         k: int = 30, temperature: float = 0.02, batch_size: int = 4096,
                         index: faiss.Index | None = None) -> np.ndarray:
    """Label propagation: ``Q x D`` queries against ``M x D`` memory -> ``Q x C`` soft labels.

    Weights are ``softmax(cos(q, m_i) / temperature)`` over the k nearest entries.
    """
    num_memory = memory_features.shape[0]
    if k > num_memory:
        raise ValueError(f"k = {k} neighbours requested but the memory holds only {num_memory} entries")
    if index is None:
        index = build_index(memory_features)
    out = np.empty((queries.shape[0], memory_labels.shape[1]), dtype=np.float32)
    for start in range(0, queries.shape[0], batch_size):
        q = torch.from_numpy(np.ascontiguousarray(queries[start:start + batch_size], dtype=np.float32))
        q = F.normalize(q, dim=1, eps=1e-6).numpy()
        sims, idx = index.search(q, k)  # Q x k, sorted by decreasing similarity
        weights = torch.softmax(torch.from_numpy(sims) / temperature, dim=1).numpy()
        out[start:start + len(q)] = np.einsum("qk,qkc->qc", weights, memory_labels[idx])
    return out


def build_index(memory_features: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(memory_features.shape[1])
    index.add(np.ascontiguousarray(memory_features, dtype=np.float32))
    return index


def predict_label_maps(soft_labels, out_size: tuple[int, int]) -> np.ndarray:
    """``V x h x w x C`` soft labels -> ``V x H x W`` class ids (bilinear upsampling, then argmax)."""
    x = torch.as_tensor(np.asarray(soft_labels, dtype=np.float32)).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)
    return x.argmax(dim=1).numpy()


def evaluate_incontext(train_features, train_label_counts, val_features, val_masks, grid: tuple[int, int],
                       num_classes: int, *, k: int = 30, temperature: float = 0.02, memory_size: int | None = None,
                       seed: int = 0, ignore_index: int = 255, batch_images: int = 64, progress: bool = False) -> dict:
    """Retrieval mIoU of ``V x N x D`` val features against an ``I x N x D`` memory (see module doc)."""
    rng = np.random.default_rng(seed)
    mem_feats, mem_labels, budget = select_memory(train_features, train_label_counts, memory_size, rng)
    index = build_index(mem_feats)
    meter = ConfusionMeter(num_classes, ignore_index)
    h, w = grid
    num_val = val_features.shape[0]
    for start in tqdm(range(0, num_val, batch_images), desc="in-context retrieval", disable=not progress,
                      file=sys.stdout, mininterval=5):
        feats = np.asarray(val_features[start:start + batch_images])
        soft = retrieve_soft_labels(feats.reshape(-1, feats.shape[-1]), mem_feats, mem_labels, k, temperature,
                                    index=index)
        masks = np.asarray(val_masks[start:start + batch_images])
        pred = predict_label_maps(soft.reshape(len(feats), h, w, -1), masks.shape[1:])
        meter.update(pred, masks)
    identity, hungarian = meter.compute("identity"), meter.compute("hungarian")
    return {
        "miou": identity["miou"], "miou_hungarian": hungarian["miou"],
        "per_class_iou": identity["per_class_iou"], "pixel_accuracy": identity["pixel_accuracy"],
        "memory_entries": int(mem_feats.shape[0]), "per_image_budget": budget,
        "k": k, "temperature": temperature,
    }
