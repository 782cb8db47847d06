"""Labelled segmentation datasets in the Pascal VOC layout, and the paired evaluation resize.

Layout read (Pascal VOC 2012, and every dataset the pipeline prepares into it)::

    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClass/<id>.png         single-channel (palette or grey), value = class id
    ROOT/SegmentationClassAug/<id>.png      optional; used for the ``trainaug`` split when present
    ROOT/ImageSets/Segmentation/<split>.txt one id per line

ADE20K (SceneParsing) is read as distributed (``ADELayoutSegmentation``)::

    ROOT/images/<split>/<id>.jpg            split = training | validation
    ROOT/annotations/<split>/<id>.png       0 = "other" (ignored), 1-150 classes

Every file problem (missing, unreadable, mask of the wrong size or mode) raises
:class:`DataError` naming the file, so a bad sample never turns into a silent wrong number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names it."""


def read_split(root: str | Path, split: str) -> list[str]:
    root = Path(root)
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        available = sorted(p.stem for p in list_file.parent.glob("*.txt")) if list_file.parent.is_dir() else []
        hint = f"; available splits: {', '.join(available)}" if available else \
            f"; is {root} a dataset in the Pascal VOC layout (run the download/prepare stage first)?"
        raise DataError(f"split list not found: {list_file}{hint}")
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split list is empty: {list_file}")
    return ids


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise DataError(f"image not found: {path}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"corrupt or unreadable image: {path} ({err})") from err


def load_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise DataError(f"mask {path} has mode {img.mode}; expected a single-channel "
                                "palette (P) or grey (L) PNG holding class ids")
            return np.array(img, dtype=np.uint8)
    except FileNotFoundError as err:
        raise DataError(f"mask not found: {path}") from err
    except (UnidentifiedImageError, OSError) as err:  # OSError: truncated or otherwise damaged PNG
        raise DataError(f"corrupt or unreadable mask: {path} ({err}); replace it with an intact copy "
                        "(re-extract or re-prepare the dataset)") from err


def check_mask_values(mask: np.ndarray, num_classes: int, ignore_index: int, path, dataset: str = "dataset") -> None:
    """Raise :class:`DataError` if ``mask`` holds a value outside ``[0, num_classes)`` other than ``ignore_index``."""
    if mask.size == 0:
        return
    counts = np.bincount(mask.reshape(-1), minlength=256)
    bad = [v for v in np.flatnonzero(counts) if v >= num_classes and v != ignore_index]
    if bad:
        raise DataError(f"mask {path} holds value {bad[0]} ({counts[bad[0]]} pixels"
                        f"{'; also ' + ', '.join(map(str, bad[1:6])) if len(bad) > 1 else ''}) but {dataset} has "
                        f"classes 0-{num_classes - 1} and ignore label {ignore_index}; is the mask from another "
                        "dataset, or a colour image instead of class ids (run the prepare stage)?")


class VOCLayoutSegmentation(Dataset):
    """Image/mask pairs of one split of a VOC-layout dataset.

    ``transform(image: PIL.Image, mask: np.ndarray) -> anything`` is applied to each pair; without
    one, items are ``(PIL image, H x W uint8 mask)``. Given ``num_classes``, a mask value that is
    neither a class id nor ``ignore_index`` raises :class:`DataError` naming the file and the value.
    """

    def __init__(self, root: str | Path, split: str, transform=None, ids: list[str] | None = None,
                 num_classes: int | None = None, ignore_index: int = 255, dataset: str = "dataset"):
        self.root = Path(root)
        # with num_classes, every mask value must be a class id or the ignore label
        self.num_classes, self.ignore_index, self.dataset = num_classes, ignore_index, dataset
        self.split = split
        self.ids = list(ids) if ids is not None else read_split(self.root, split)
        aug = self.root / "SegmentationClassAug"
        self.mask_dir = aug if split == "trainaug" and aug.is_dir() else self.root / "SegmentationClass"
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.root / "JPEGImages" / f"{self.ids[index]}.jpg"

    def mask_path(self, index: int) -> Path:
        return self.mask_dir / f"{self.ids[index]}.png"

    def __getitem__(self, index: int):
        image = load_rgb(self.image_path(index))
        mask = load_mask(self.mask_path(index))
        if mask.shape != (image.height, image.width):
            raise DataError(f"mask {self.mask_path(index)} is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"{self.image_path(index)} is {image.width}x{image.height}")
        if self.num_classes is not None:
            check_mask_values(mask, self.num_classes, self.ignore_index, self.mask_path(index), self.dataset)
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask


class ResizePair:
    """Deterministic evaluation transform: image and mask resized to ``size x size``.

    The image is resized bicubically (or with ``resample``) with antialiasing and normalised with
    ``mean`` and ``std`` (default: ImageNet's); the mask with nearest-neighbour (labels must not be blended). Aspect ratio is not kept,
    as in the Hummingbird protocol.
    """

    def __init__(self, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, resample: int = Image.BICUBIC,
                 torch_nearest_mask: bool = False):
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.resample = resample
        # torch's "nearest" samples source pixel floor(x * in / out), PIL's the centre one
        # floor((x + 0.5) * in / out); open-hummingbird-eval resizes its masks with torch's
        self.torch_nearest_mask = torch_nearest_mask

    def __call__(self, image: Image.Image, mask: np.ndarray):
        if image.size != (self.size, self.size):  # already at size: resampling would be an identity
            image = image.resize((self.size, self.size), self.resample)
        if mask.shape != (self.size, self.size) and self.torch_nearest_mask:
            mask = torch.nn.functional.interpolate(torch.from_numpy(np.array(mask))[None, None].float(),
                                                   size=(self.size, self.size), mode="nearest")[0, 0].numpy()
        elif mask.shape != (self.size, self.size):
            mask = np.asarray(Image.fromarray(mask).resize((self.size, self.size), Image.NEAREST))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        x = (x / 255.0 - self.mean) / self.std
        return x, torch.from_numpy(np.array(mask, dtype=np.uint8))


class ADELayoutSegmentation(VOCLayoutSegmentation):
    """Image/mask pairs of ADE20K SceneParsing as distributed; ids are the annotation files' stems."""

    def __init__(self, root: str | Path, split: str, transform=None, ids: list[str] | None = None,
                 num_classes: int | None = None, ignore_index: int = 0, dataset: str = "ade20k"):
        root = Path(root)
        mask_dir = root / "annotations" / split
        if ids is None:
            if not mask_dir.is_dir():
                available = sorted(p.name for p in (root / "annotations").iterdir()) \
                    if (root / "annotations").is_dir() else []
                raise DataError(f"ADE20K split folder not found: {mask_dir}"
                                + (f"; available: {', '.join(available)}" if available else
                                   f"; is {root} the ADEChallengeData2016 folder (run the prepare stage first)?"))
            ids = sorted(p.stem for p in mask_dir.glob("*.png"))
            if not ids:
                raise DataError(f"no masks (*.png) in {mask_dir}")
        super().__init__(root, split, transform, ids, num_classes, ignore_index, dataset)
        self.mask_dir = mask_dir

    def image_path(self, index: int) -> Path:
        return self.root / "images" / self.split / f"{self.ids[index]}.jpg"


def segmentation_dataset(spec, root: str | Path, split: str, transform=None, ids: list[str] | None = None,
                         check_values: bool = True):
    """The dataset class of ``spec.layout`` for one split, checking mask values against the spec."""
    checks = {"num_classes": spec.num_classes if check_values else None, "ignore_index": spec.ignore_index,
              "dataset": spec.name}
    if spec.layout == "ade":
        return ADELayoutSegmentation(root, split, transform, ids, **checks)
    if spec.layout == "voc":
        return VOCLayoutSegmentation(root, split, transform, ids, **checks)
    raise ValueError(f"dataset {spec.name} has layout {spec.layout!r}, which has no segmentation loader")
