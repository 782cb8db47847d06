"""ORL stage 2c/2d: selective-search region proposals and ORL's box filter.

Selective search is OpenCV's (``cv2.ximgproc.segmentation``, fast mode, defaults base_k=150,
inc_k=150, sigma=0.8) on the full-resolution image, as ORL's ``selective_search.py``. Its *set* of
boxes is deterministic but their *order* comes from the C library's ``rand()``, which ORL does not
seed; the filter keeps boxes first-come, so the order decides the RoIs. We seed ``rand()`` with the
image's index in the image list before each image (``srand(index)``), which makes the order, and
so the RoIs, reproducible and independent of sharding.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BoxFilter:
    """ORL's ``box_filter`` settings (COCO: 96 px, aspect 3, IoU 0.5, 100 boxes)."""

    min_size: int = 96
    max_aspect_ratio: float = 3.0
    max_iou: float = 0.5
    top_n: int = 100


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_LIBC = _libc()


def selective_search(image_rgb: np.ndarray, seed: int) -> np.ndarray:
    """``H x W x 3`` uint8 RGB -> ``N x 4`` int32 ``(x, y, w, h)`` boxes in OpenCV's (seeded) order."""
    import cv2

    if _LIBC is None:
        raise RuntimeError("the C library (for srand) was not found; selective search's box order cannot be seeded")
    _LIBC.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(image_rgb[:, :, ::-1]))  # OpenCV works in BGR
    search.switchToSelectiveSearchFast()
    return np.asarray(search.process(), dtype=np.int32).reshape(-1, 4)


def _iou_one_to_many(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[0] + box[2], others[:, 0] + others[:, 2])
    y2 = np.minimum(box[1] + box[3], others[:, 1] + others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / (box[2] * box[3] + others[:, 2] * others[:, 3] - inter)


def filter_boxes(boxes: np.ndarray, settings: BoxFilter = BoxFilter()) -> np.ndarray:
    """ORL's filter, in the given order: ``N x 4`` (x, y, w, h) -> ``M x 4`` kept boxes, ``1 <= M <= top_n``.

    A box is dropped if ``w`` or ``h`` < ``min_size``, if ``max(w/h, h/w)`` > ``max_aspect_ratio``,
    or if its IoU with a box already kept is > ``max_iou`` (greedy, first come); the first
    ``top_n`` survivors are kept. If none survives, the first raw box is kept (as ORL does), so
    every image has a RoI; an image with no box at all is an error for the caller.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if len(boxes) == 0:
        raise ValueError("no proposal at all (empty or corrupt image?)")
    w, h = boxes[:, 2], boxes[:, 3]
    ok = (w >= settings.min_size) & (h >= settings.min_size)
    ok &= np.maximum(w, h) <= settings.max_aspect_ratio * np.minimum(w, h)
    kept: list[np.ndarray] = []
    for box in boxes[ok]:
        if len(kept) == settings.top_n:
            break
        if not kept or _iou_one_to_many(box, np.stack(kept)).max() <= settings.max_iou:
            kept.append(box)
    if not kept:
        kept = [boxes[0]]
    return np.stack(kept).astype(np.int32)
