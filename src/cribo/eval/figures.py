"""Figures: in-context predictions beside the ground truth, and cross-image object matches.

- :func:`incontext_figure`: for a few validation images, the image, its ground truth and the
  in-context prediction (the retrieval of :mod:`cribo.eval.incontext`, same memory and settings),
  coloured with one palette.
- :func:`object_matches_figure`, in the spirit of the paper's Figures 4 and 5: the teacher's
  tokens of a few query images are clustered into objects as in training (Sinkhorn with the
  spatial term, the two "views" being the same image); each query object's nearest object (cosine
  similarity of the mean tokens, as the memory bank compares them) among the objects of a set of
  memory images is shown beside it. The bank of a checkpoint stores vectors without their images,
  so the memory here is rebuilt from images that can be displayed.

Both write PNGs through a temporary file and a rename.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cribo.config import save_figure  # noqa: E402
from cribo.eval.incontext import _propagate, build_index, predict_label_maps, select_memory  # noqa: E402
from cribo.method.clustering import joint_view_clustering  # noqa: E402


def palette(num_classes: int) -> np.ndarray:
    """``(C + 1) x 3`` uint8 colours: the PASCAL VOC bit-interleaving colour map; the last row (ignored) white."""
    colours = np.zeros((num_classes + 1, 3), dtype=np.uint8)
    for c in range(num_classes):
        r = g = b = 0
        label = c
        for shift in range(7, -1, -1):
            r |= ((label >> 0) & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        colours[c] = (r, g, b)
    colours[num_classes] = 255
    return colours


def colourise(labels: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``H x W`` labels -> ``H x W x 3`` colours (ignored pixels white)."""
    idx = np.where((labels == ignore_index) | (labels >= num_classes), num_classes, labels)
    return palette(num_classes)[idx]


def _save(fig, out: str | Path) -> Path:
    return save_figure(fig, out, dpi=110, bbox_inches="tight")


def incontext_predictions(train, val, indices: list[int], *, k: int = 30, temperature: float = 0.02,
                          memory_size: int | None = None, seed: int = 0) -> np.ndarray:
    """``len(indices) x S x S`` predicted label maps of validation images from feature stores."""
    rng = np.random.default_rng(seed)
    mem_feats, mem_labels = select_memory(np.asarray(train.features), np.asarray(train.label_counts), memory_size, rng)
    index = build_index(mem_feats)
    h, w = val.grid
    feats = np.asarray(val.features[indices])
    soft = _propagate(feats.reshape(-1, feats.shape[-1]), index, mem_labels, k, temperature)
    return predict_label_maps(soft.reshape(len(indices), h, w, -1), np.asarray(val.masks).shape[1:])


def incontext_figure(images: list[np.ndarray], masks: np.ndarray, predictions: np.ndarray, num_classes: int,
                     ignore_index: int, out: str | Path, title: str = "") -> Path:
    """Rows of (image, ground truth, prediction); images ``S x S x 3`` uint8, masks/predictions ``V x S x S``."""
    fig, axes = plt.subplots(len(images), 3, figsize=(6.6, 2.2 * len(images)), squeeze=False)
    for row, (image, mask, pred) in enumerate(zip(images, masks, predictions)):
        for col, (panel, name) in enumerate([(image, "image"), (colourise(mask, num_classes, ignore_index), "ground truth"),
                                             (colourise(pred, num_classes, ignore_index), "in-context prediction")]):
            axes[row, col].imshow(panel)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)


@torch.no_grad()
def image_objects(backbone, images: torch.Tensor, num_clusters: int, pos_alpha: float, seed: int = 0):
    """Objects of each image: ``(B x h x w`` cluster maps, list of ``K_b x D`` mean tokens, list of cluster ids)``.

    ``backbone``: any :class:`cribo.models.backbones.PatchFeatureExtractor` (a ViT's tokens or a ResNet's
    res5 map, ``B x h x w x D``).
    """
    tokens = backbone(images).float()  # B x h x w x D
    b, h, w, d = tokens.shape
    flat = tokens.reshape(b, h * w, d)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    pos = torch.stack([ys.flatten() / h, xs.flatten() / w], dim=-1).expand(b, -1, -1)
    # the same image as both "views": the clustering then assigns both copies alike
    assignment = joint_view_clustering(torch.cat([flat, flat], 1), torch.cat([pos, pos], 1), num_clusters, pos_alpha,
                                       generator=torch.Generator().manual_seed(seed))[:, : h * w]
    labels = assignment.argmax(-1)  # B x N
    vectors, ids = [], []
    for i in range(b):
        present = labels[i].unique()
        vectors.append(torch.stack([flat[i][labels[i] == c].mean(0) for c in present]))
        ids.append(present.tolist())
    return labels.reshape(b, h, w), vectors, ids


def nearest_objects(query_vectors: torch.Tensor, memory_vectors: list[torch.Tensor]):
    """For each query object (``Q x D``), ``(memory image, object index, cosine)`` of its nearest memory object."""
    owners = [(i, j) for i, vecs in enumerate(memory_vectors) for j in range(len(vecs))]
    bank = F.normalize(torch.cat(memory_vectors), dim=-1)
    sims = F.normalize(query_vectors, dim=-1) @ bank.T
    best = sims.argmax(-1)
    return [(*owners[int(j)], float(sims[q, j])) for q, j in enumerate(best)]


def object_matches_figure(query_images: list[np.ndarray], query_maps: torch.Tensor, query_ids: list[list[int]],
                          matches: list[list[tuple[int, int, float]]], memory_images: list[np.ndarray],
                          memory_maps: torch.Tensor, memory_ids: list[list[int]], out: str | Path,
                          max_objects: int = 4) -> Path:
    """For each query image: up to ``max_objects`` rows of (query object highlighted, its nearest memory object)."""
    rows = [(q, o) for q in range(len(query_images)) for o in range(min(max_objects, len(query_ids[q])))]
    fig, axes = plt.subplots(len(rows), 2, figsize=(4.4, 2.2 * len(rows)), squeeze=False)

    def show(ax, image, cluster_map, cluster, caption):
        size = image.shape[0]
        mask = F.interpolate((cluster_map == cluster).float()[None, None], size=(size, size), mode="nearest")[0, 0]
        shaded = image.astype(np.float32) * (0.25 + 0.75 * mask.numpy()[..., None])
        ax.imshow(shaded.astype(np.uint8))
        ax.contour(mask.numpy(), levels=[0.5], colors="yellow", linewidths=1)
        ax.set_title(caption, fontsize=8)
        ax.set_axis_off()

    for r, (q, o) in enumerate(rows):
        mem_image, mem_object, similarity = matches[q][o]
        show(axes[r, 0], query_images[q], query_maps[q], query_ids[q][o], f"query {q}, object {o}")
        show(axes[r, 1], memory_images[mem_image], memory_maps[mem_image], memory_ids[mem_image][mem_object],
             f"nearest: image {mem_image} (cos {similarity:.2f})")
    return _save(fig, out)
