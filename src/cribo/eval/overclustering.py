"""Overclustering: how well do k-means clusters of frozen patch features align with classes?

The protocol of Leopart and NeCo, which CrIBo reports (``evaluation.md`` §4): the validation set's
patch features are standardised (per dimension), reduced to 50 dimensions by PCA (``faiss.PCAMatrix``)
and clustered by ``faiss.Kmeans`` (100 iterations, 5 restarts keeping the lowest objective), once
per seed (5 seeds, results averaged). Each image's cluster map is upsampled (nearest) to the mask
resolution. Clusters are matched to classes:

- ``K`` = number of classes: one-to-one, Hungarian on ``1 - IoU`` (the "fully unsupervised" setting);
- ``K`` > number of classes (300, 500): greedy many-to-one, each cluster to the class it overlaps
  most (its highest precision); several clusters may share a class.

The matched prediction is scored with the dataset-level confusion matrix of :mod:`cribo.eval.metrics`.
Masks are the feature store's (resized to the evaluation size), not Leopart's 100 x 100.

Shapes: V validation images, N = h * w patches, D feature width, S mask side, K clusters, C classes.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from cribo.eval.metrics import hungarian_permutation, miou_from_confusion


def reduce_features(features: np.ndarray, pca_dim: int = 50) -> np.ndarray:
    """``P x D`` -> ``P x pca_dim`` float32: standardised per dimension, then PCA (faiss)."""
    x = np.asarray(features, dtype=np.float32)
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-6)
    x = np.ascontiguousarray(x)
    if pca_dim >= x.shape[1]:
        return x
    pca = faiss.PCAMatrix(x.shape[1], pca_dim)
    pca.train(x)
    return pca.apply(x)


def kmeans_labels(x: np.ndarray, clusters: int, seed: int, iterations: int = 100, restarts: int = 5) -> np.ndarray:
    """Cluster id of each row of ``x`` (``P``) by faiss k-means; raises if there are fewer rows than clusters."""
    if x.shape[0] < clusters:
        raise ValueError(f"{x.shape[0]} patches cannot form {clusters} clusters; lower K or use more images")
    km = faiss.Kmeans(x.shape[1], clusters, niter=iterations, nredo=restarts, seed=seed, spherical=False,
                      verbose=False)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0].astype(np.int64)


def cluster_class_counts(cluster_maps: np.ndarray, masks: np.ndarray, clusters: int, num_classes: int,
                         ignore_index: int = 255) -> np.ndarray:
    """``C x K`` pixel counts of (class, cluster); ``cluster_maps`` and ``masks`` are ``V x S x S``."""
    pred = cluster_maps.reshape(-1).astype(np.int64)
    target = masks.reshape(-1).astype(np.int64)
    keep = target != ignore_index
    if keep.any() and target[keep].max() >= num_classes:
        raise ValueError(f"mask label {int(target[keep].max())} is outside [0, {num_classes})")
    return np.bincount(target[keep] * clusters + pred[keep], minlength=num_classes * clusters).reshape(
        num_classes, clusters)


def match_clusters(counts: np.ndarray) -> np.ndarray:
    """Class of each cluster (``K``): Hungarian if ``K == C``, else each cluster's majority class."""
    num_classes, clusters = counts.shape
    if clusters == num_classes:
        permutation = hungarian_permutation(counts)  # column permutation[c] is matched to class c
        mapping = np.empty(clusters, dtype=np.int64)
        mapping[permutation] = np.arange(num_classes)
        return mapping
    if clusters < num_classes:
        raise ValueError(f"{clusters} clusters for {num_classes} classes: use K >= the number of classes")
    return counts.argmax(axis=0)


def matched_confusion(counts: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """``C x C`` confusion (rows = ground truth) after mapping each cluster to a class."""
    num_classes = counts.shape[0]
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(conf.T, mapping, counts.T)
    return conf


def overcluster(features: np.ndarray, masks: np.ndarray, grid: tuple[int, int], num_classes: int, clusters: int,
                *, seeds=(0, 1, 2, 3, 4), pca_dim: int = 50, iterations: int = 100, restarts: int = 5,
                ignore_index: int = 255) -> dict:
    """Overclustering mIoU of ``V x N x D`` features against ``V x S x S`` masks, mean and std over seeds.

    Returns ``{"miou", "miou_std", "per_seed_miou", "pixel_accuracy" (mean over seeds, after the same
    cluster-to-class mapping), "per_class_iou" (mean over seeds, None if never valid), "clusters", "matching",
    "seeds", "pca_dim", "iterations", "restarts"}``.
    """
    v, n, _ = features.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"features hold {n} patches per image but the grid is {h}x{w}")
    x = reduce_features(np.asarray(features).reshape(v * n, -1), pca_dim)
    size = masks.shape[1:]
    exclude = (ignore_index,) if 0 <= ignore_index < num_classes else ()
    scores, per_class, accuracies = [], [], []
    for seed in seeds:
        labels = kmeans_labels(x, clusters, seed, iterations, restarts).reshape(v, 1, h, w)
        maps = F.interpolate(torch.from_numpy(labels).float(), size=size, mode="nearest").long()[:, 0].numpy()
        counts = cluster_class_counts(maps, np.asarray(masks), clusters, num_classes, ignore_index)
        result = miou_from_confusion(matched_confusion(counts, match_clusters(counts)), "identity", exclude)
        scores.append(result["miou"])
        accuracies.append(result["pixel_accuracy"])
        per_class.append(result["per_class_iou"])
    per_class_mean = [None if all(p[c] is None for p in per_class) else
                      float(np.mean([p[c] for p in per_class if p[c] is not None])) for c in range(num_classes)]
    return {"miou": float(np.mean(scores)), "miou_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
            "per_seed_miou": scores, "pixel_accuracy": float(np.mean(accuracies)), "per_class_iou": per_class_mean, "clusters": clusters,
            "matching": "hungarian" if clusters == num_classes else "many-to-one", "seeds": list(seeds),
            "pca_dim": pca_dim, "iterations": iterations, "restarts": restarts}
