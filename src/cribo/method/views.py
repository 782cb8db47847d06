"""Augmented views for self-distillation: DINO's multi-crop recipe with CrIBo's crop scale.

Follows DINO's ``DataAugmentationDINO`` (and CrIBo's ``DataAugmentationCrIBo``), built on
torchvision ``transforms.v2`` and driven by torch's RNG (``torch.manual_seed`` makes it repeatable):

- global view 1: RandomResizedCrop (bicubic, antialiased) -> flip -> ColorJitter(0.4, 0.4, 0.2, 0.1)
  (``dino.color_jitter``) with p=0.8 -> grayscale p=0.2 -> Gaussian blur p=1.0 -> float + Normalize;
- global view 2: the same, but blur p=0.1 and Solarize (threshold 128 on 8-bit values) p=0.2;
- local views: a smaller crop at ``local_scale``, same flip/colour, blur p=0.5.

Blur is DINO's and BYOL's: PIL's ``GaussianBlur`` with its radius (the standard deviation) drawn in
(0.1, 2.0) px. Uint8 tensor inputs are blurred by torchvision instead, with a kernel of about a tenth of
the crop side (23 px at 224, 9 px at 96), since its blur needs a kernel size.
CrIBo uses global crops of scale (0.25, 1) and no local crops; DINO uses (0.4, 1) plus local crops.
Inputs are PIL images (or uint8 tensors): solarisation thresholds 8-bit values.

:class:`CrIBoViews` also returns, for each view, a map of original-image coordinates: the same
crop and flip are applied to a grid holding every pixel's (x, y), so after averaging over a patch
each token knows where in the original image it looks. That is how the two views are aligned
(through the clustering's spatial term), with no box projection.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

# One definition of the ImageNet statistics for the package, re-exported here:
# IMAGENET_MEAN = (0.485, 0.456, 0.406), IMAGENET_STD = (0.229, 0.224, 0.225).
from cribo.data.segmentation import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PILGaussianBlur", "DINOViews", "CrIBoViews", "BYOLViews", "PatchViews", "patch_positions",
           "eval_transform"]


def blur_kernel_size(size: int) -> int:
    """Odd Gaussian kernel of about a tenth of the crop side (23 at 224, as in BYOL), at least 3."""
    return max(3, (size // 10) | 1)


class PILGaussianBlur(T.GaussianBlur):
    """torchvision's ``GaussianBlur`` (same parameters, same draw of sigma from torch's RNG) that
    blurs PIL images with PIL's own Gaussian filter, radius = sigma, as the official DINO, CrIBo and
    ORL pipelines do. PIL needs no kernel size, and on small crops it is ~3x faster than the
    image -> tensor -> convolution -> image round trip; tensors keep torchvision's kernel."""

    def transform(self, inpt, params):
        if isinstance(inpt, Image.Image):
            return inpt.filter(ImageFilter.GaussianBlur(radius=params["sigma"][0]))
        return super().transform(inpt, params)


def _blur(size: int, p: float) -> T.Transform:
    return T.RandomApply([PILGaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=p)


def _to_tensor(mean, std) -> list[T.Transform]:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]


DEFAULT_JITTER = (0.4, 0.4, 0.2, 0.1)  # DINO's and CrIBo's (brightness, contrast, saturation, hue)


def _colour(jitter=DEFAULT_JITTER) -> list[T.Transform]:
    return [T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=0.2)]


def colour_transforms(jitter=DEFAULT_JITTER) -> T.Compose:
    """The views' colour distortion alone (jitter p=0.8, grayscale p=0.2) on ``3 x H x W`` [0, 1] images."""
    return T.Compose(_colour(jitter))


class DINOViews:
    """DINO multi-crop: ``__call__(PIL image) -> [global_1, global_2, local_1, ...]``.

    Global views are ``3 x global_size x global_size``, local views ``3 x local_size x local_size``,
    all float32 normalised with ``mean`` / ``std``. ``global_scale`` / ``local_scale`` are the
    area fractions of RandomResizedCrop (aspect ratio in (3/4, 4/3)).
    """

    def __init__(self, global_size: int = 96, local_size: int = 48, num_local_crops: int = 0,
                 global_scale: tuple[float, float] = (0.25, 1.0), local_scale: tuple[float, float] = (0.05, 0.25),
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, jitter=DEFAULT_JITTER):
        if num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {num_local_crops}")

        def crop(size, scale):
            return [T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
                    T.RandomHorizontalFlip()]

        tail = _to_tensor(mean, std)
        self.global_1 = T.Compose(crop(global_size, global_scale) + _colour(jitter) + [_blur(global_size, 1.0)] + tail)
        self.global_2 = T.Compose(crop(global_size, global_scale) + _colour(jitter) + [_blur(global_size, 0.1),
                                  T.RandomSolarize(threshold=128, p=0.2)] + tail)
        self.local = T.Compose(crop(local_size, local_scale) + _colour(jitter) + [_blur(local_size, 0.5)] + tail)
        self.num_local_crops = num_local_crops

    def __call__(self, image) -> list[torch.Tensor]:
        views = [self.global_1(image), self.global_2(image)]
        views.extend(self.local(image) for _ in range(self.num_local_crops))
        return views


class CrIBoViews:
    """``__call__(PIL image) -> (views, positions)``: two ``3 x S x S`` views and their ``2 x S x S``
    maps of original-image (x, y) pixel coordinates (bicubic resampling of the coordinate grid, as
    the official code does)."""

    def __init__(self, size: int = 96, scale: tuple[float, float] = (0.25, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 jitter=DEFAULT_JITTER):
        self.size, self.scale = size, scale
        tail = _to_tensor(mean, std)
        self.colour_1 = T.Compose(_colour(jitter) + [_blur(size, 1.0)] + tail)
        self.colour_2 = T.Compose(_colour(jitter) + [_blur(size, 0.1), T.RandomSolarize(threshold=128, p=0.2)] + tail)

    def crop_with_positions(self, image, box: tuple[int, int, int, int] | None = None, flip: bool | None = None):
        """Crop ``box = (top, left, height, width)`` (random when None), resize, maybe flip."""
        width, height = image.size
        top, left, h, w = box or RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
        grid = torch.stack([xs, ys])
        crop = TF.resized_crop(image, top, left, h, w, [self.size, self.size],
                               interpolation=InterpolationMode.BICUBIC, antialias=True)
        positions = TF.resized_crop(grid, top, left, h, w, [self.size, self.size],
                                    interpolation=InterpolationMode.BICUBIC, antialias=False)
        if (torch.rand(()) < 0.5) if flip is None else flip:
            crop, positions = TF.horizontal_flip(crop), TF.horizontal_flip(positions)
        return crop, positions

    def __call__(self, image) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        (crop1, pos1), (crop2, pos2) = self.crop_with_positions(image), self.crop_with_positions(image)
        return [self.colour_1(crop1), self.colour_2(crop2)], [pos1, pos2]


def patch_positions(positions: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean original coordinate of each patch: ``B x 2 x S x S`` -> ``B x N x 2`` (row-major patches)."""
    pooled = torch.nn.functional.avg_pool2d(positions, patch_size)  # B x 2 x h x w
    return pooled.flatten(2).transpose(1, 2)


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """Deterministic: PIL image -> ``3 x size x size`` float32, resized (bicubic, antialiased, aspect
    ratio not kept) and normalised ``(x / 255 - mean) / std``."""
    return T.Compose([T.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True)]
                     + _to_tensor(mean, std))


class BYOLViews:
    """BYOL's asymmetric pair (ORL stage 1): ``__call__(PIL image) -> [view_1, view_2]``, each ``3 x S x S``.

    RandomResizedCrop (bilinear, area ``scale``, aspect (3/4, 4/3)) -> flip -> ColorJitter(0.4, 0.4,
    0.2, 0.1) p=0.8 -> grayscale p=0.2 -> Gaussian blur (p=1.0 in view 1, 0.1 in view 2) ->
    solarize (p=0 in view 1, 0.2 in view 2) -> normalise.
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.08, 1.0), mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        crop = [T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BILINEAR, antialias=True),
                T.RandomHorizontalFlip()]
        tail = _to_tensor(mean, std)
        self.view_1 = T.Compose(crop + _colour() + [_blur(size, 1.0)] + tail)
        self.view_2 = T.Compose(crop + _colour() + [_blur(size, 0.1), T.RandomSolarize(threshold=128, p=0.2)] + tail)

    def __call__(self, image) -> list[torch.Tensor]:
        return [self.view_1(image), self.view_2(image)]


class PatchViews:
    """ORL's RoI-patch pair pipeline: no crop, the patches are already cut and resized.

    ``__call__(patch_1, patch_2) -> [3 x R x R, 3 x R x R]``: flip -> colour -> blur (1.0 / 0.1) ->
    solarize (0 / 0.2) -> normalise, the asymmetry of :class:`BYOLViews`.
    """

    def __init__(self, size: int = 96, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        tail = _to_tensor(mean, std)
        flip = [T.RandomHorizontalFlip()]
        self.view_1 = T.Compose(flip + _colour() + [_blur(size, 1.0)] + tail)
        self.view_2 = T.Compose(flip + _colour() + [_blur(size, 0.1), T.RandomSolarize(threshold=128, p=0.2)] + tail)

    def __call__(self, patch_1, patch_2) -> list[torch.Tensor]:
        return [self.view_1(patch_1), self.view_2(patch_2)]
