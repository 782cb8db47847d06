"""Segmentation metrics from a dataset-level confusion matrix.

IoU is computed per class over all pixels of all images (one confusion matrix for the whole
evaluation set, not a mean of per-image IoUs), as every dense protocol of the paper does.

Conventions
-----------
- Confusion matrix: rows = ground truth, columns = prediction. Pixels whose ground truth equals
  ``ignore_index`` are dropped before counting.
- IoU_c = TP_c / (TP_c + FP_c + FN_c).
- Mean (mmsegmentation's ``nanmean`` convention): the mean runs over the classes whose union
  TP + FP + FN is non-zero. A class absent from both the ground truth and the prediction has no IoU
  (``None``) and is left out of the mean; a class absent from the ground truth but predicted has
  IoU 0 and counts. (open-hummingbird-eval's ``PredsmIoU`` instead averages over all rows, giving
  classes with union 0 an IoU of 0; the two agree whenever every class occurs.)
- Classes listed in ``exclude`` (``ConfusionMeter`` passes its ``ignore_index`` when that label is a
  valid class id, e.g. ADE20K's "other" = 0) get ``None`` and are left out of the mean; their
  columns still count, i.e. a pixel predicted as an excluded class is a false negative of its
  true class.
- Two label mappings: ``identity`` (the prediction is a class id, as in label transfer) and
  ``hungarian`` (prediction columns permuted one-to-one onto ground-truth classes first, by
  ``scipy.optimize.linear_sum_assignment`` on ``1 - IoU`` of every (ground truth, prediction) pair,
  as open-hummingbird-eval's ``PredsmIoU.compute`` does by default). Hungarian >= identity.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment

MATCHINGS = ("identity", "hungarian")


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore_index: int | None = 255) -> np.ndarray:
    """Pixel counts of (ground truth, prediction) pairs.

    Args:
        pred: integer labels, any shape (e.g. ``B x H x W``).
        target: integer labels, same shape as ``pred``; ``ignore_index`` marks pixels to drop.
        num_classes: C.
        ignore_index: ground-truth label to drop, or None to keep every pixel.

    Returns:
        ``C x C`` int64, rows = ground truth, columns = prediction.

    Raises:
        ValueError: shapes differ; a prediction lies outside ``[0, C)`` (checked on every pixel,
            ignored ones included); a ground-truth label other than ``ignore_index`` lies outside
            ``[0, C)`` (the message names the value).
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target differ in shape: {pred.shape} vs {target.shape}")
    pred = pred.reshape(-1).astype(np.int64, copy=False)
    target = target.reshape(-1).astype(np.int64, copy=False)
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted labels must lie in [0, {num_classes}), got values in "
                         f"[{pred.min()}, {pred.max()}]")
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    bad = (target < 0) | (target >= num_classes)
    if bad.any():
        raise ValueError(f"ground-truth label {int(target[bad][0])} is outside [0, {num_classes}) and is not "
                         f"the ignore label {ignore_index}")
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def pairwise_iou(conf: np.ndarray) -> np.ndarray:
    """IoU of ground-truth class g with predicted label p for every pair: ``C x C`` float64 (0 where
    the pair's union is empty)."""
    conf = np.asarray(conf, dtype=np.float64)
    union = conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - conf
    out = np.zeros_like(conf)
    np.divide(conf, union, out=out, where=union > 0)
    return out


def hungarian_permutation(conf: np.ndarray) -> np.ndarray:
    """Column order ``perm`` such that ``conf[:, perm]`` puts on the diagonal the one-to-one matching
    of predicted labels to ground-truth classes of maximal total IoU (``perm[g]`` = predicted label
    assigned to class g)."""
    gt_idx, pred_idx = linear_sum_assignment(1.0 - pairwise_iou(conf))
    perm = np.empty(conf.shape[1], dtype=np.int64)
    perm[gt_idx] = pred_idx
    return perm


def miou_from_confusion(conf: np.ndarray, matching: str = "identity", exclude: Iterable[int] = ()) -> dict:
    """mIoU from a ``C x C`` confusion matrix (rows = ground truth); conventions in the module doc.

    Returns:
        ``{"miou": percent (0-100), "per_class_iou": list of C percents or None (union 0 or
        excluded), "pixel_accuracy": percent, "num_valid_classes": number of classes in the mean}``.
        With no valid class at all, ``miou`` is 0.0.
    """
    conf = np.asarray(conf, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    if matching == "hungarian":
        conf = conf[:, hungarian_permutation(conf)]
    elif matching != "identity":
        raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    valid = union > 0
    for c in exclude:
        if 0 <= c < len(valid):
            valid[c] = False
    iou = np.zeros_like(tp)
    np.divide(tp, union, out=iou, where=valid)
    total = conf.sum()
    return {
        "miou": float(iou[valid].mean() * 100) if valid.any() else 0.0,
        "per_class_iou": [float(iou[c] * 100) if valid[c] else None for c in range(len(iou))],
        "pixel_accuracy": float(tp.sum() / total * 100) if total else 0.0,
        "num_valid_classes": int(valid.sum()),
    }


def miou_over_all_classes(conf: np.ndarray, matching: str = "hungarian") -> float:
    """open-hummingbird-eval's reported mIoU (percent): IoU per class after ``matching``, averaged
    over all C classes, a class with an empty union (or no ground truth, like ADE20K's ignored
    "other") counting 0 instead of being left out."""
    per_class = miou_from_confusion(conf, matching)["per_class_iou"]
    return float(np.mean([iou or 0.0 for iou in per_class]))


class ConfusionMeter:
    """Streams a confusion matrix over batches: ``update(pred, target)`` any number of times, then
    ``compute(matching)``. If ``ignore_index`` is itself a class id (``0 <= ignore_index < C``), that
    class is excluded from the mean (it can have no ground-truth pixel)."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred, target) -> None:
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self, matching: str = "identity") -> dict:
        exclude = () if self.ignore_index is None else (self.ignore_index,)
        return miou_from_confusion(self.matrix, matching, exclude=exclude)

    def reset(self) -> None:
        self.matrix[:] = 0
