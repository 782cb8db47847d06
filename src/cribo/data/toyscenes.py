"""``toyscenes``: the embedded dataset, generated deterministically on any machine.

Scene-centric images in the spirit of COCO at toy scale: each image has one or two background
"stuff" regions and two to four objects of distinct classes that may occlude each other.

- Stuff classes (ids 0-2): ``waves``, ``blotches``, ``bricks``, each its own texture family.
- Object classes (ids 3-8): each its own shape *and* its own texture: ``disk`` (solid),
  ``square`` (checker), ``triangle`` (stripes), ``star`` (rings), ``cross`` (dots),
  ``hexagon`` (gradient).

Every colour, of stuff and objects alike, is drawn from one palette shared by all classes. Class
identity therefore cannot be read from colour: it lies in shape and texture, which is what dense
self-supervised features must learn. (With class-specific colours a random network already
retrieves the classes well and the toy table would say nothing about learning.)

Files written (the Pascal VOC layout, plus COCO instances so both kinds of loaders serve it)::

    JPEGImages/<id>.jpg                  RGB, quality 95
    SegmentationClass/<id>.png           palette PNG: class id per pixel, 255 on object borders
    ImageSets/Segmentation/{train,trainaug,val}.txt
    annotations/instances_{train,val}.json   COCO instances (RLE) of the visible object parts
    meta.json                            classes, sizes, seed, generator version

Image ``i`` of a split depends only on ``(seed, split, i)``, so the output is byte-identical
whatever the number of worker processes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from pycocotools import mask as mask_utils

STUFF_CLASSES = ("waves", "blotches", "bricks")
OBJECT_CLASSES = ("disk", "square", "triangle", "star", "cross", "hexagon")
CLASS_NAMES = STUFF_CLASSES + OBJECT_CLASSES
IGNORE_INDEX = 255
GENERATOR_VERSION = 1
_SPLIT_CODES = {"train": 1, "val": 2}
_MIN_VISIBLE = 0.35  # an object keeps at least this share of its area after occlusion


def _palette_colour(rng: np.random.Generator) -> np.ndarray:
    """One colour of the shared palette (16 hues at random saturation and brightness), jittered."""
    hue = (rng.integers(16) + rng.uniform(-0.2, 0.2)) / 16.0
    sat, val = rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    return 255.0 * (val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two palette colours different enough for a texture to be visible."""
    c1 = _palette_colour(rng)
    for _ in range(20):
        c2 = _palette_colour(rng)
        if np.abs(c1 - c2).sum() > 150:
            break
    return c1, c2


def _blend(pattern: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """``H x W`` pattern in [0, 1] -> ``H x W x 3`` mix of two colours."""
    return c1 + pattern[..., None] * (c2 - c1)


# ---------------- stuff textures (image coordinates) ----------------

def _stuff_pattern(cls: int, ys: np.ndarray, xs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    if cls == 0:  # waves: smooth sinusoidal bands with a wobble
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.25, 0.45)
        u = xs * np.cos(theta) + ys * np.sin(theta)
        v = -xs * np.sin(theta) + ys * np.cos(theta)
        return 0.5 + 0.5 * np.sin(freq * u + 2.5 * np.sin(0.12 * v + rng.uniform(0, 6)))
    if cls == 1:  # blotches: thresholded low-frequency noise (camouflage)
        cells = int(rng.integers(4, 7))
        noise = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        field = np.asarray(noise.resize((size, size), Image.BICUBIC), dtype=np.float64) / 255.0
        return (field > 0.5).astype(np.float64)
    # bricks: rows of offset rectangles separated by mortar lines
    brick_h = rng.uniform(5, 9)
    brick_w = brick_h * rng.uniform(1.8, 2.6)
    row = np.floor(ys / brick_h)
    shifted = xs + (row % 2) * brick_w / 2
    mortar = ((ys % brick_h) < 1.5) | ((shifted % brick_w) < 1.5)
    return mortar.astype(np.float64)


# ---------------- object shapes and textures (object coordinates u, v in units of the radius) ----------------

def _shape(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if cls == 0:  # disk
        return rho <= 1.0
    if cls == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if cls == 2:  # triangle: three half-planes
        normals = [np.pi / 2 + k * 2 * np.pi / 3 for k in range(3)]
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.5 for a in normals], axis=0)
    if cls == 3:  # five-pointed star
        return rho <= 0.42 + 0.58 * ((np.cos(5 * phi) + 1) / 2) ** 1.5
    if cls == 4:  # cross
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 0.95))
    normals = [k * np.pi / 3 for k in range(3)]  # hexagon
    return np.all([np.abs(u * np.cos(a) + v * np.sin(a)) <= 0.87 for a in normals], axis=0)


def _object_pattern(cls: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if cls == 0:  # solid
        return np.zeros_like(u)
    if cls == 1:  # checker
        f = rng.uniform(2.0, 3.0)
        return ((np.floor(u * f) + np.floor(v * f)) % 2).astype(np.float64)
    if cls == 2:  # stripes
        return (np.sin(v * rng.uniform(7.0, 10.0)) > 0).astype(np.float64)
    if cls == 3:  # concentric rings
        return (np.sin(np.hypot(u, v) * rng.uniform(9.0, 13.0)) > 0).astype(np.float64)
    if cls == 4:  # dots
        f = rng.uniform(2.5, 3.5)
        return ((((u * f) % 1 - 0.5) ** 2 + ((v * f) % 1 - 0.5) ** 2) < 0.08).astype(np.float64)
    return np.clip((u + 1) / 2, 0, 1)  # gradient


def render_scene(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One scene: ``H x W x 3`` uint8 image, ``H x W`` uint8 labels, visible instances (class, mask)."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.zeros((size, size, 3))
    labels = np.zeros((size, size), np.uint8)

    # background: one stuff region, or two split by a random line
    stuff = rng.permutation(len(STUFF_CLASSES))[: 1 + int(rng.random() < 0.6)]
    region = np.zeros((size, size), bool)
    if len(stuff) == 2:
        theta = rng.uniform(0, np.pi)
        offset = rng.uniform(0.3, 0.7) * size
        wobble = rng.uniform(0, 4) * np.sin(0.15 * (xs * np.sin(theta) - ys * np.cos(theta)))
        region = (xs - size / 2) * np.cos(theta) + (ys - size / 2) * np.sin(theta) + size / 2 + wobble > offset
    for k, cls in enumerate(stuff):
        where = region if k == 1 else ~region
        c1, c2 = _two_colours(rng)
        image[where] = _blend(_stuff_pattern(int(cls), ys, xs, size, rng), c1, c2)[where]
        labels[where] = cls

    # objects: 2 to 4 distinct classes, painted in order (later ones occlude earlier ones)
    n_objects = int(rng.integers(2, 5))
    classes = rng.permutation(len(OBJECT_CLASSES))[:n_objects]
    owner = np.full((size, size), -1, np.int64)
    shapes = []
    for k, cls in enumerate(classes):
        radius = rng.uniform(0.075, 0.225) * size
        cx, cy = rng.uniform(0.1, 0.9, size=2) * size
        theta = rng.uniform(0, 2 * np.pi)
        dx, dy = (xs - cx) / radius, (ys - cy) / radius
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        inside = _shape(int(cls), u, v)
        if not inside.any():
            continue
        c1, c2 = _two_colours(rng)
        image[inside] = _blend(_object_pattern(int(cls), u, v, rng), c1, c2)[inside]
        owner[inside] = k
        shapes.append((k, int(cls), inside.sum()))

    instances = []
    for k, cls, area in shapes:
        visible = owner == k
        if visible.sum() < _MIN_VISIBLE * area:
            continue  # mostly hidden: painted, but labelled as what covers it
        labels[visible] = len(STUFF_CLASSES) + cls
        instances.append({"category_id": len(STUFF_CLASSES) + cls, "mask": visible})
    # objects too hidden to count are repainted as the stuff beneath them would not be: mark them void
    hidden = (owner >= 0) & ~np.any([i["mask"] for i in instances] or [np.zeros_like(region)], axis=0)
    labels[hidden] = IGNORE_INDEX

    # a one-pixel void band along the inside of object outlines, as in Pascal VOC
    obj = labels >= len(STUFF_CLASSES)
    border = np.zeros_like(obj)
    padded = np.pad(labels, 1, mode="edge")
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        border |= obj & (padded[dy:dy + size, dx:dx + size] != labels)
    labels[border & (labels != IGNORE_INDEX)] = IGNORE_INDEX

    image += rng.normal(0, 6, image.shape)  # sensor noise
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5))
    return np.asarray(picture), labels, instances


def _voc_palette() -> list[int]:
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    palette[IGNORE_INDEX * 3: IGNORE_INDEX * 3 + 3] = [255, 255, 255]
    return palette


def _write_one(job: tuple[Path, int, str, int, int]) -> list[dict]:
    root, seed, split, index, size = job
    image_id = f"{split}_{index:06d}"
    image, labels, instances = render_scene(seed, split, index, size)
    Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    png = Image.fromarray(labels, mode="P")
    png.putpalette(_voc_palette())
    png.save(root / "SegmentationClass" / f"{image_id}.png")
    annotations = []
    for inst in instances:
        rle = mask_utils.encode(np.asfortranarray(inst["mask"].astype(np.uint8)))
        annotations.append({
            "category_id": inst["category_id"], "iscrowd": 0,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            "area": float(mask_utils.area(rle)), "bbox": [float(x) for x in mask_utils.toBbox(rle)],
        })
    return annotations


def _params(num_train: int, num_val: int, image_size: int, seed: int) -> dict:
    return {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}


def generate(root: str | Path, num_train: int = 2000, num_val: int = 200, image_size: int = 112,
             seed: int = 0, workers: int = 2, progress: bool = True) -> Path:
    """Generate the dataset into ``root`` (atomically); return ``root``.

    An existing ``root`` generated with the same parameters is kept as is; one generated with
    other parameters raises :class:`FileExistsError`.
    """
    for name, value, low, high in (("num_train", num_train, 1, 10**7), ("num_val", num_val, 1, 10**7),
                                   ("image_size", image_size, 32, 1024), ("workers", workers, 1, 256)):
        if not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"toyscenes: {name} must be an integer in [{low}, {high}], got {value!r}")
    root = Path(root)
    params = _params(num_train, num_val, image_size, seed)
    if root.exists():
        meta_path = root / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        differing = [k for k, v in params.items() if meta.get(k) != v]
        if not meta or meta.get("generator_version") != GENERATOR_VERSION:
            raise FileExistsError(f"{root} exists but is not a toyscenes dataset of this version; remove it")
        if differing:
            raise FileExistsError(f"{root} holds toyscenes generated with other settings "
                                  f"({', '.join(f'{k}={meta.get(k)}' for k in differing)}); remove it or pick another folder")
        return root

    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "annotations"):
        (tmp / sub).mkdir(parents=True)
    try:
        for split, count in (("train", num_train), ("val", num_val)):
            jobs = [(tmp, seed, split, i, image_size) for i in range(count)]
            if workers > 1:
                with ProcessPoolExecutor(workers) as pool:
                    results = list(_progress(pool.map(_write_one, jobs, chunksize=32), count, split, progress))
            else:
                results = list(_progress(map(_write_one, jobs), count, split, progress))
            ids = [f"{split}_{i:06d}" for i in range(count)]
            lists = [split, "trainaug"] if split == "train" else [split]
            for name in lists:
                (tmp / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
            _write_coco(tmp / "annotations" / f"instances_{split}.json", ids, results, image_size)
        meta = {"name": "toyscenes", "classes": list(CLASS_NAMES), "stuff_classes": list(STUFF_CLASSES),
                "num_classes": len(CLASS_NAMES), "ignore_index": IGNORE_INDEX,
                "generator_version": GENERATOR_VERSION, **params}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # written last: marks completion
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def _progress(iterable, total: int, split: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=f"toyscenes {split}", file=sys.stdout, mininterval=2)


def _write_coco(path: Path, ids: list[str], per_image: list[list[dict]], size: int) -> None:
    images, annotations = [], []
    for image_num, (image_id, anns) in enumerate(zip(ids, per_image), start=1):
        images.append({"id": image_num, "file_name": f"JPEGImages/{image_id}.jpg", "width": size, "height": size})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_num, **ann})
    categories = [{"id": len(STUFF_CLASSES) + i, "name": name, "supercategory": "object"}
                  for i, name in enumerate(OBJECT_CLASSES)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
