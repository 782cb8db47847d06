"""DINO multi-crop views and the evaluation transform: sizes, determinism, normalisation by hand."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2 as T

from cribo.method.views import (IMAGENET_MEAN, IMAGENET_STD, CrIBoViews, DINOViews, PILGaussianBlur, blur_kernel_size,
                                eval_transform, patch_positions)


def _noise(width=64, height=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_number_and_sizes_of_views():
    views = DINOViews(global_size=32, local_size=16, num_local_crops=3)(_noise())
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views)
    assert [tuple(v.shape) for v in DINOViews()(_noise())] == [(3, 96, 96)] * 2  # defaults: CrIBo, no locals
    with pytest.raises(ValueError, match="num_local_crops"):
        DINOViews(num_local_crops=-1)


def test_views_are_deterministic_under_the_torch_seed():
    views, image = DINOViews(global_size=32, local_size=16, num_local_crops=2), _noise()
    torch.manual_seed(1)
    a = views(image)
    torch.manual_seed(1)
    b = views(image)
    torch.manual_seed(2)
    c = views(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])  # the two global views are cropped independently


def test_eval_transform_normalises_a_constant_image_by_hand():
    # 128 / 255 = 0.501961; (0.501961 - 0.485) / 0.229, (0.501961 - 0.456) / 0.224, (0.501961 - 0.406) / 0.225
    out = eval_transform(8)(Image.new("RGB", (20, 20), (128, 128, 128)))
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    for channel, value in enumerate([0.074065, 0.205183, 0.426493]):
        assert torch.allclose(out[channel], torch.full((8, 8), value), atol=1e-5)
    # custom statistics: (255/255 - 0.5) / 0.5 = 1, (0 - 0.5) / 0.5 = -1, (51/255 - 0.5) / 0.5 = -0.6
    out = eval_transform(4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(Image.new("RGB", (9, 5), (255, 0, 51)))
    assert out[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, -0.6], abs=1e-6)


def test_eval_transform_output_shape_ignores_the_aspect_ratio():
    assert tuple(eval_transform(10)(_noise(30, 17)).shape) == (3, 10, 10)
    a, b = eval_transform(12)(_noise()), eval_transform(12)(_noise())
    assert torch.equal(a, b)  # no randomness


def test_views_of_a_grey_image_stay_grey():
    # Crop, flip, resize and blur keep a constant image constant; jitter, grayscale and solarisation
    # map a grey pixel (v, v, v) to another grey level (solarise: 128 -> 255 - 128 = 127). So each view,
    # unnormalised, is one 8-bit grey level on every pixel and channel.
    views = DINOViews(global_size=24, local_size=12, num_local_crops=2)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.manual_seed(0)
    levels = set()
    for _ in range(5):
        for view in views(Image.new("RGB", (40, 30), (128, 128, 128))):
            pixels = (view * std + mean) * 255
            level = pixels[0, 0, 0].item()
            assert torch.allclose(pixels, torch.full_like(pixels, level), atol=1e-3)
            assert level == pytest.approx(round(level), abs=1e-3)
            levels.add(round(level))
    assert 128 in levels and len(levels) > 3  # jitter applied to some views, not to others


def _spec(pipeline: T.Compose) -> list[tuple[str, float]]:
    """(transform name, probability) of every step, looking inside RandomApply."""
    steps = []
    for t in pipeline.transforms:
        if isinstance(t, T.RandomApply):
            steps += [(type(inner).__name__, t.p) for inner in t.transforms]
        else:
            steps.append((type(t).__name__, getattr(t, "p", 1.0)))
    return steps


def test_the_recipe_follows_dino():
    views = DINOViews(global_size=96, local_size=48, num_local_crops=1)
    common = [("RandomResizedCrop", 1.0), ("RandomHorizontalFlip", 0.5), ("ColorJitter", 0.8), ("RandomGrayscale", 0.2)]
    tail = [("ToImage", 1.0), ("ToDtype", 1.0), ("Normalize", 1.0)]
    assert _spec(views.global_1) == common + [("PILGaussianBlur", 1.0)] + tail
    assert _spec(views.global_2) == common + [("PILGaussianBlur", 0.1), ("RandomSolarize", 0.2)] + tail
    assert _spec(views.local) == common + [("PILGaussianBlur", 0.5)] + tail
    jitter = views.global_1.transforms[2].transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2),
                                                                                   (-0.1, 0.1))
    blur = views.global_1.transforms[4].transforms[0]
    assert list(blur.sigma) == [0.1, 2.0] and list(blur.kernel_size) == [9, 9]
    # odd kernels of about a tenth of the crop (the tensor path's)
    assert [blur_kernel_size(s) for s in (224, 96, 48, 16)] == [23, 9, 5, 3]


def test_blur_is_pils_gaussian_with_the_drawn_radius():
    blur = PILGaussianBlur(9, sigma=(0.1, 2.0))
    torch.manual_seed(3)
    sigma = torch.empty(1).uniform_(0.1, 2.0).item()  # the draw the transform makes under the same seed
    image = _noise()
    torch.manual_seed(3)
    out = blur(image)
    assert isinstance(out, Image.Image)
    assert np.array_equal(np.asarray(out), np.asarray(image.filter(ImageFilter.GaussianBlur(radius=sigma))))
    # a radius is a standard deviation: an impulse spreads into a bump of variance sigma^2 per axis
    impulse = np.zeros((41, 41), dtype=np.uint8)
    impulse[20, 20] = 255
    bump = np.asarray(blur.transform(Image.fromarray(impulse).convert("RGB"), {"sigma": [1.5, 1.5]}))[..., 0]
    weights = bump.astype(np.float64) / bump.sum()
    offsets = np.arange(41) - 20
    assert weights.sum(0) @ offsets ** 2 == pytest.approx(1.5 ** 2, rel=0.15)
    assert weights.sum(1) @ offsets == pytest.approx(0.0, abs=0.05)
    # uint8 tensors keep torchvision's kernel
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    torch.manual_seed(3)
    assert torch.equal(blur(tensor), T.functional.gaussian_blur(tensor, [9, 9], [sigma, sigma]))


def test_crop_position_maps_follow_the_crop_and_the_flip():
    views = CrIBoViews(size=8)
    image = Image.new("RGB", (40, 20))
    _, pos = views.crop_with_positions(image, box=(4, 10, 8, 16), flip=False)
    # output pixel u samples original x = left + (u + 0.5) * w / S - 0.5 = 10.5 + 2u; y = top + v
    for u in range(2, 6):  # interior: bicubic reproduces a linear ramp exactly
        assert pos[0, 3, u].item() == pytest.approx(10.5 + 2 * u, abs=1e-4)
        assert pos[1, u, 3].item() == pytest.approx(4 + u, abs=1e-4)
    _, flipped = views.crop_with_positions(image, box=(4, 10, 8, 16), flip=True)
    assert torch.allclose(flipped, pos.flip(-1))
    # a 4-pixel patch's mean x is the mean of its four columns
    grid = patch_positions(pos[None], 4)
    assert grid.shape == (1, 4, 2)
    assert grid[0, 1, 0].item() == pytest.approx(pos[0, :4, 4:8].mean().item(), rel=1e-5)
    views_out, pos_out = views(image)
    assert [tuple(v.shape) for v in views_out] == [(3, 8, 8)] * 2 and [tuple(p.shape) for p in pos_out] == [(2, 8, 8)] * 2
