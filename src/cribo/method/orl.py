"""ORL's stage 3 (Xie et al., NeurIPS 2021): object-level BYOL on image, intra-image and cross-image RoI pairs.

Per image and epoch (``openselfsup/datasets/orl.py`` in the official code):

- a **global pair**: the two BYOL views of the image;
- an **intra-RoI pair**: a random filtered RoI of the image and a jittered copy of it
  (:func:`jitter_box`);
- an **inter-RoI pair**: a random neighbour image, then a random retrieved (query RoI, neighbour
  RoI) pair from stage 2 (:mod:`cribo.method.correspondence`).

RoI patches are cut from the original image and resized to ``orl.roi_size`` (96) pixels, then
get flip and colour augmentations (:class:`~cribo.method.views.PatchViews`, no crop). The
backbone, projector and EMA target are shared; each pair type has its own predictor; the loss is
``w_g L_global + w_intra L_intra + w_inter L_inter`` (1/1/1), each the symmetric BYOL loss.
Training starts from scratch: stage 1 only supplies the correspondences.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cribo.data.segmentation import load_rgb
from cribo.method.byol import BYOLMethod
from cribo.method.correspondence import Correspondence, CorrespondenceError, load_correspondence


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``(x, y, w, h)`` boxes: ``A x 4, B x 4 -> A x B`` (pixel-area convention, no +1)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    y2 = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def jitter_box(box, width: int, height: int, attempts: int = 200, generator: torch.Generator | None = None) -> tuple:
    """A random copy of ``box = (x, y, w, h)`` that overlaps it, ORL's ``aug_bbox``.

    The copy's area is the box's times U(0.5, 2), its aspect ratio (w / h) log-uniform in
    [0.5, 2], its centre shifted by U(-0.5, 0.5) times (w, h). A draw is accepted when it lies
    inside the ``width x height`` image, is at least 1 px wide and high, and has IoU > 0.5 with
    the box; after ``attempts`` rejected draws the box itself is returned. Draws come from torch's
    RNG (``generator`` or the global one). Returns integer ``(x, y, w, h)``.
    """
    x, y, w, h = (int(v) for v in box)
    for _ in range(attempts):
        scale, log_ratio, dx, dy = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        area = w * h * (0.5 + 1.5 * scale)
        ratio = math.exp(math.log(0.5) + (math.log(2.0) - math.log(0.5)) * log_ratio)
        new_w, new_h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        cx, cy = x + w / 2 + (dx - 0.5) * w, y + h / 2 + (dy - 0.5) * h
        nx, ny = int(round(cx - new_w / 2)), int(round(cy - new_h / 2))
        if new_w < 1 or new_h < 1 or nx < 0 or ny < 0 or nx + new_w > width or ny + new_h > height:
            continue
        if box_iou([x, y, w, h], [nx, ny, new_w, new_h])[0, 0] > 0.5:
            return nx, ny, new_w, new_h
    return x, y, w, h


def crop_patch(image, box, size: int):
    """Cut ``box = (x, y, w, h)`` out of a PIL image and resize it to ``size x size`` (bilinear)."""
    x, y, w, h = (int(v) for v in box)
    return TF.resized_crop(image, y, x, h, w, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


class ORLPairs(Dataset):
    """Stage-3 samples: ``[[global_1, global_2], [intra_1, intra_2], [inter_1, inter_2]]`` per image.

    Indexed by ``i`` or ``(i, seed)`` like :class:`cribo.data.images.UnlabeledImages`: with a seed,
    every draw (views, RoI choice, jitter, neighbour, pair) depends on nothing else.
    """

    def __init__(self, paths: list[Path], corr: Correspondence, global_views, patch_views, roi_size: int,
                 jitter_attempts: int = 200):
        self.paths, self.corr = list(paths), corr
        self.global_views, self.patch_views = global_views, patch_views
        self.roi_size, self.jitter_attempts = roi_size, jitter_attempts

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        seed = None
        if isinstance(index, (tuple, list)):
            index, seed = index
        if seed is None:
            return self._sample(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._sample(index)

    def _pick(self, n: int) -> int:
        return int(torch.randint(n, ()).item())

    def _sample(self, i: int):
        corr, size = self.corr, self.roi_size
        image = load_rgb(self.paths[i])
        global_pair = self.global_views(image)
        boxes = corr.image_boxes(i)
        box = boxes[self._pick(len(boxes))]
        jittered = jitter_box(box, image.width, image.height, self.jitter_attempts)
        intra = self.patch_views(crop_patch(image, box, size), crop_patch(image, jittered, size))
        slot = self._pick(corr.k)
        j = int(corr.knn[i, slot])
        pairs = corr.neighbour_pairs(i, slot)
        query_box, neighbour_box = pairs[self._pick(len(pairs))]
        neighbour = load_rgb(self.paths[j])
        inter = self.patch_views(crop_patch(image, boxes[query_box], size),
                                 crop_patch(neighbour, corr.image_boxes(j)[neighbour_box], size))
        return [global_pair, intra, inter]


def image_names(paths: list[Path], root: str | Path) -> list[str]:
    """The image list as stored in stage-2 files: paths relative to the dataset root, POSIX style."""
    root = Path(root)
    return [Path(p).relative_to(root).as_posix() for p in paths]


class ORLMethod(BYOLMethod):
    """ORL stage 3: three predictors (global, intra, inter) on a shared BYOL backbone, projector and target."""

    name = "orl"
    branches = ("global", "intra", "inter")

    def dataset(self, paths):
        from cribo.method.views import BYOLViews, PatchViews

        orl_cfg, data_cfg = self.cfg["orl"], self.cfg["data"]
        if not orl_cfg["correspondence"]:
            raise CorrespondenceError("method orl needs orl.correspondence: the stage-2 file of this dataset "
                                      "(the workflow's orl_correspondence rule writes it)")
        corr = load_correspondence(orl_cfg["correspondence"])
        corr.check_images(image_names(paths, data_cfg["root"]), data_cfg["dataset"], orl_cfg["correspondence"])
        return ORLPairs(paths, corr, BYOLViews(self.cfg["model"]["img_size"], tuple(self.cfg["byol"]["crop_scale"])),
                        PatchViews(orl_cfg["roi_size"]), orl_cfg["roi_size"], orl_cfg["jitter_attempts"])

    def pairs(self, batch):
        return [list(pair) for pair in batch]

    def loss_weights(self):
        return dict(self.cfg["orl"]["loss_weights"])
