"""Paired image/mask transforms of the mmsegmentation 512 x 512 protocols, in PyTorch and PIL.

The linear (``mmseg``) and fine-tuning protocols of the paper ran on mmsegmentation 1.x, which no
longer installs against current torch; its data pipeline is small and well specified, so it is
rewritten here (facts from the configs, ``evaluation.md`` §2.2):

training: ``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)`` ->
``RandomCrop(512, cat_max_ratio=0.75)`` -> horizontal flip 0.5 -> ``PhotoMetricDistortion`` ->
pad to 512 x 512 (image 0, mask 255);
test: resize to fit inside (2048, 512) keeping the ratio; the mask stays at its original size
and predictions are resized to it (IoU at the original resolution).

Normalisation: mmseg's Segmenter configs use mean = std = 127.5, but every backbone evaluated here
was pretrained with the ImageNet statistics, so ``imagenet`` is the default and ``half`` (127.5)
reproduces the configs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from cribo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD

NORMALISATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}


def fit_scale(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` with keep_ratio: the largest (w, h) with the long side <= max(scale)
    and the short side <= min(scale)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def _normalise(image: Image.Image, normalisation: str) -> torch.Tensor:
    mean, std = NORMALISATIONS[normalisation]
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def photometric_distortion(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a ``3 x H x W`` uint8 image.

    Each step with probability 0.5: brightness shift in [-32, 32]; contrast x [0.5, 1.5] (before or
    after the colour steps, by a coin flip); saturation x [0.5, 1.5]; hue shift in [-18, 18] degrees.
    """
    def coin() -> bool:
        return bool(torch.rand((), generator=generator) < 0.5)

    def uniform(low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand((), generator=generator))

    x = image.float()
    if coin():
        x = (x + uniform(-32, 32)).clamp(0, 255)
    contrast_first = coin()
    if contrast_first and coin():
        x = (x * uniform(0.5, 1.5)).clamp(0, 255)
    if coin():
        x = TF.adjust_saturation(x / 255.0, uniform(0.5, 1.5)).clamp(0, 1) * 255.0
    if coin():
        x = TF.adjust_hue(x / 255.0, uniform(-18, 18) / 360.0).clamp(0, 1) * 255.0
    if not contrast_first and coin():
        x = (x * uniform(0.5, 1.5)).clamp(0, 255)
    return x.round().to(torch.uint8)


class MmsegTrainTransform:
    """Training pipeline: ``(PIL image, H x W uint8 mask) -> (3 x crop x crop float, crop x crop long)``.

    Randomness comes from ``torch``'s global generator (seeded per worker by the DataLoader), so a
    run is reproducible for a fixed seed and worker count.
    """

    def __init__(self, crop: int = 512, scale: tuple[int, int] = (2048, 512), ratio_range=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, ignore_index: int = 255, normalisation: str = "imagenet",
                 photometric: bool = True):
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {sorted(NORMALISATIONS)}, got {normalisation!r}")
        self.crop, self.scale, self.ratio_range = crop, tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.ignore_index = cat_max_ratio, ignore_index
        self.normalisation, self.photometric = normalisation, photometric

    def crop_box(self, mask: np.ndarray, generator: torch.Generator) -> tuple[int, int]:
        """Top-left corner of the crop; up to 10 draws so that no class covers more than
        ``cat_max_ratio`` of the crop (mmseg's rule: only when the crop holds 2+ classes)."""
        h, w = mask.shape
        for _ in range(10):
            top = int(torch.randint(0, max(h - self.crop, 0) + 1, (), generator=generator))
            left = int(torch.randint(0, max(w - self.crop, 0) + 1, (), generator=generator))
            if self.cat_max_ratio >= 1:
                break
            window = mask[top:top + self.crop, left:left + self.crop]
            labels, counts = np.unique(window[window != self.ignore_index], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left

    def __call__(self, image: Image.Image, mask: np.ndarray, generator: torch.Generator | None = None):
        generator = generator if generator is not None else torch.default_generator
        ratio = self.ratio_range[0] + (self.ratio_range[1] - self.ratio_range[0]) * float(
            torch.rand((), generator=generator))
        width, height = fit_scale(image.width, image.height,
                                  (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image = image.resize((width, height), Image.BILINEAR)
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
        top, left = self.crop_box(mask, generator)
        image = image.crop((left, top, left + min(self.crop, width), top + min(self.crop, height)))
        mask = mask[top:top + self.crop, left:left + self.crop]
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        m = torch.from_numpy(np.array(mask, dtype=np.uint8))
        if torch.rand((), generator=generator) < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        if self.photometric:
            x = photometric_distortion(x, generator)
        x = _normalise(Image.fromarray(x.permute(1, 2, 0).numpy()), self.normalisation)
        # pad bottom/right to the crop size: image 0 (after normalisation, as mmseg's preprocessor), mask ignored
        pad_h, pad_w = self.crop - x.shape[1], self.crop - x.shape[2]
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), value=0.0)
            m = torch.nn.functional.pad(m, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return x, m.long()


class MmsegTestTransform:
    """Test pipeline: the image resized to fit ``scale`` (ratio kept), the mask left at its size.

    Returns ``(3 x h x w float, H x W long)``; batch with ``batch_size=1`` (sizes differ).
    """

    def __init__(self, scale: tuple[int, int] = (2048, 512), normalisation: str = "imagenet"):
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {sorted(NORMALISATIONS)}, got {normalisation!r}")
        self.scale, self.normalisation = tuple(scale), normalisation

    def __call__(self, image: Image.Image, mask: np.ndarray):
        size = fit_scale(image.width, image.height, self.scale)
        if size != image.size:
            image = image.resize(size, Image.BILINEAR)
        return _normalise(image, self.normalisation), torch.from_numpy(np.array(mask, dtype=np.uint8)).long()


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's ``slide_inference`` grid: ``(top, left, bottom, right)`` windows of side <= ``crop``
    every ``stride`` pixels, the last one flush with the border, covering every pixel."""
    rows = max(math.ceil((height - crop) / stride), 0) + 1
    cols = max(math.ceil((width - crop) / stride), 0) + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(bottom - crop, 0), max(right - crop, 0), bottom, right))
    return boxes
