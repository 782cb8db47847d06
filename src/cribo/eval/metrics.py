"""Segmentation metrics from a dataset-level confusion matrix.

IoU is computed per class over all pixels of all images (not per image), as every dense protocol
of the paper does. Mean convention (mmsegmentation's): the mean runs over classes whose union
(TP + FP + FN) is non-zero; a class absent from the ground truth but predicted counts with IoU 0.
Two label mappings: ``identity`` (the prediction is a class id, as in label transfer) and
``hungarian`` (predicted labels matched one-to-one to ground-truth labels first, maximising the
matched IoU, as open-hummingbird-eval and clustering evaluations report).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """``num_classes x num_classes`` int64 counts, rows = ground truth, columns = prediction."""
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    target = np.asarray(target).reshape(-1).astype(np.int64)
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target differ in size: {pred.shape} vs {target.shape}")
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    bad = target[(target < 0) | (target >= num_classes)]
    if bad.size:
        raise ValueError(f"ground-truth label {int(bad[0])} is outside [0, {num_classes}) and is not the "
                         f"ignore label {ignore_index}")
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted labels must lie in [0, {num_classes}), got [{pred.min()}, {pred.max()}]")
    return np.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _iou_per_class(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan), union


def miou_from_confusion(conf: np.ndarray, matching: str = "identity") -> dict:
    """mIoU (percent) and per-class IoU from a confusion matrix; see the module docstring."""
    conf = np.asarray(conf, dtype=np.int64)
    if matching == "hungarian":
        iou_pairs = _pairwise_iou(conf)
        gt_idx, pred_idx = linear_sum_assignment(-iou_pairs)
        # column pred_idx[i] becomes class gt_idx[i]
        order = np.empty(conf.shape[1], dtype=np.int64)
        order[gt_idx] = pred_idx
        conf = conf[:, order]
    elif matching != "identity":
        raise ValueError(f"matching must be 'identity' or 'hungarian', got {matching!r}")
    iou, union = _iou_per_class(conf)
    valid = union > 0
    total = conf.sum()
    return {
        "miou": float(np.nanmean(iou[valid]) * 100) if valid.any() else 0.0,
        "per_class_iou": [None if np.isnan(v) else float(v * 100) for v in iou],
        "pixel_accuracy": float(np.trace(conf) / total * 100) if total else 0.0,
        "num_valid_classes": int(valid.sum()),
    }


def _pairwise_iou(conf: np.ndarray) -> np.ndarray:
    """IoU of ground-truth class g with predicted label p, for every pair: ``C x C``."""
    gt_count = conf.sum(1, keepdims=True)
    pred_count = conf.sum(0, keepdims=True)
    union = gt_count + pred_count - conf
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, conf / union, 0.0)


class ConfusionMeter:
    """Accumulates a confusion matrix over batches: ``update(pred, target)``, then ``compute()``."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, target) -> None:
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self, matching: str = "identity") -> dict:
        return miou_from_confusion(self.matrix, matching)
