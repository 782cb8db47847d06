"""``toyscenes``: the embedded dataset, generated deterministically on any machine.

Scene-centric images in the spirit of COCO at toy scale: each image has one or two background
"stuff" regions and two to four objects of distinct classes that may partly occlude each other.

- Stuff classes (ids 0-2): ``waves``, ``blotches``, ``bricks``, each its own texture family.
- Object classes (ids 3-8): each its own shape *and* its own texture: ``disk`` (solid),
  ``square`` (checker), ``triangle`` (stripes), ``star`` (concentric rings), ``cross`` (dots),
  ``hexagon`` (gradient).

Every colour, of stuff and objects alike, is drawn from one palette shared by all classes, and
every texture covers about half of its object with each of its two colours; the solid disk is
painted in a random mix of its two colours, so neither its mean colour nor its pixel colours
stand out from those of the textured classes.
Class identity therefore cannot be read from colour: it lies in shape and texture, which is what
dense self-supervised features must learn. (With class-specific colours a randomly initialised
network already retrieves the classes well and the toy table would say nothing about learning.)

Files written under ``root`` (the Pascal VOC layout, plus COCO instances so both kinds of
loaders serve it)::

    JPEGImages/<id>.jpg                      RGB, quality 95; ids train_000000, val_000000, ...
    SegmentationClass/<id>.png               palette PNG: class id per pixel, 255 on object borders
    ImageSets/Segmentation/{train,trainaug,val}.txt
    annotations/instances_{train,val}.json   COCO instances (RLE) of the visible object parts
    meta.json                                classes, sizes, seed, generator version

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
# Version 2 (version 1 differs in pixels): textures sized in pixels so small objects show them,
# occlusion bounded at placement instead of voiding hidden objects, colour mixes balanced.
GENERATOR_VERSION = 2
_SPLIT_CODES = {"train": 1, "val": 2}
_MIN_VISIBLE = 0.5  # every object keeps at least half of its area after occlusion
_PLACEMENT_TRIES = 50
_REF_SIZE = 112.0  # texture periods below are in pixels at this image size and scale with it
_MIN_PERIOD = 4.0  # no texture finer than this many pixels: it would alias into noise


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


def _period(rng: np.random.Generator, low: float, high: float, scale: float) -> float:
    return max(_MIN_PERIOD, rng.uniform(low, high) * scale)


# ---------------- stuff textures (image coordinates, pixels) ----------------

def _stuff_pattern(cls: int, ys: np.ndarray, xs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    scale = size / _REF_SIZE
    if cls == 0:  # waves: sinusoidal bands at any orientation, with a slow wobble along them
        theta = rng.uniform(0, np.pi)
        u = xs * np.cos(theta) + ys * np.sin(theta)
        v = -xs * np.sin(theta) + ys * np.cos(theta)
        wobble = 2.5 * np.sin(2 * np.pi * v / (rng.uniform(40, 70) * scale) + rng.uniform(0, 2 * np.pi))
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / _period(rng, 12, 22, scale) + wobble + rng.uniform(0, 2 * np.pi))
    if cls == 1:  # blotches: low-frequency noise cut at its median (camouflage), finer than objects
        cells = int(rng.integers(7, 12))
        noise = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        field = np.asarray(noise.resize((size, size), Image.BICUBIC), dtype=np.float64)
        return (field > np.median(field)).astype(np.float64)
    # bricks: rows of offset rectangles separated by mortar lines
    brick_h = _period(rng, 6, 10, scale)
    brick_w = brick_h * rng.uniform(1.8, 2.6)
    mortar = max(1.0, 1.5 * scale)
    ys = ys + rng.uniform(0, brick_h)
    row = np.floor(ys / brick_h)
    shifted = xs + (row % 2) * brick_w / 2 + rng.uniform(0, brick_w)
    return (((ys % brick_h) < mortar) | ((shifted % brick_w) < mortar)).astype(np.float64)


# ---------------- object shapes (u, v in units of the radius) and textures ----------------

def _shape(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if cls == 0:  # disk
        return u * u + v * v <= 1.0
    if cls == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if cls == 2:  # triangle: three half-planes
        normals = [np.pi / 2 + k * 2 * np.pi / 3 for k in range(3)]
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.5 for a in normals], axis=0)
    if cls == 3:  # five-pointed star
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        return rho <= 0.42 + 0.58 * ((np.cos(5 * phi) + 1) / 2) ** 1.5
    if cls == 4:  # cross
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 0.95))
    normals = [k * np.pi / 3 for k in range(3)]  # hexagon
    return np.all([np.abs(u * np.cos(a) + v * np.sin(a)) <= 0.87 for a in normals], axis=0)


def _object_pattern(cls: int, u: np.ndarray, v: np.ndarray, radius: float, scale: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Texture in [0, 1] covering about half of the object with each colour.

    Periods are in pixels, not in units of the radius, so small objects keep a visible texture.
    """
    up, vp = u * radius, v * radius
    if cls == 0:
        # Solid in a random mix of the two colours: a pure palette colour would make disks' mean
        # colours stand out (textures average two colours), an even mix their pixel colours.
        return np.full_like(u, rng.uniform(0.0, 1.0))
    if cls == 1:  # checker
        cell = _period(rng, 8, 12, scale) / 2
        return ((np.floor(up / cell) + np.floor(vp / cell)) % 2).astype(np.float64)
    if cls == 2:  # stripes
        return (np.sin(2 * np.pi * vp / _period(rng, 6, 10, scale) + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float64)
    if cls == 3:  # concentric rings
        return (np.sin(2 * np.pi * np.hypot(up, vp) / _period(rng, 6, 9, scale)) > 0).astype(np.float64)
    if cls == 4:  # dots of radius 0.4 period: they cover half of the area
        p = _period(rng, 6, 9, scale)
        return ((((up / p) % 1 - 0.5) ** 2 + ((vp / p) % 1 - 0.5) ** 2) < 0.16).astype(np.float64)
    return np.clip((u + 1) / 2, 0, 1)  # gradient across the object


def _background(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, size: int,
                image: np.ndarray, labels: np.ndarray) -> None:
    """One stuff region, or two split by a straight or wavy line."""
    stuff = rng.permutation(len(STUFF_CLASSES))[: 1 + int(rng.random() < 0.6)]
    region = np.zeros((size, size), bool)
    if len(stuff) == 2:
        theta = rng.uniform(0, np.pi)
        offset = rng.uniform(0.3, 0.7) * size
        along = xs * np.sin(theta) - ys * np.cos(theta)
        wobble = rng.uniform(0, 0.06) * size * np.sin(2 * np.pi * along / (rng.uniform(0.3, 0.8) * size))
        region = (xs - size / 2) * np.cos(theta) + (ys - size / 2) * np.sin(theta) + size / 2 + wobble > offset
    for k, cls in enumerate(stuff):
        where = region if k == 1 else ~region
        c1, c2 = _two_colours(rng)
        image[where] = _blend(_stuff_pattern(int(cls), ys, xs, size, rng), c1, c2)[where]
        labels[where] = cls


def render_scene(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Render image ``index`` of ``split``.

    Returns the ``H x W x 3`` uint8 image, the ``H x W`` uint8 label map (class ids, 255 on object
    borders) and the visible instances as ``{"category_id", "mask"}`` dicts in painting order.
    """
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.zeros((size, size, 3))
    labels = np.zeros((size, size), np.uint8)
    _background(rng, ys, xs, size, image, labels)

    # Objects are painted in order, later ones on top. A placement is redrawn when it would hide
    # more than half of an object below it, so every object stays recognisable by its shape.
    classes = rng.permutation(len(OBJECT_CLASSES))[: int(rng.integers(2, 5))]
    owner = np.full((size, size), -1, np.int64)
    full_area, visible_area, placed = [], [], []
    for cls in classes:
        cls = int(cls)
        # the first two objects must be placed (at least two per image); later ones may be dropped
        tries = _PLACEMENT_TRIES * (20 if len(placed) < 2 else 1)
        for _ in range(tries):
            radius = rng.uniform(0.075, 0.225) * size
            cx, cy = rng.uniform(0.6 * radius, size - 0.6 * radius, size=2)
            theta = rng.uniform(0, 2 * np.pi)
            dx, dy = (xs - cx) / radius, (ys - cy) / radius
            u = dx * np.cos(theta) + dy * np.sin(theta)
            v = -dx * np.sin(theta) + dy * np.cos(theta)
            inside = _shape(cls, u, v)
            covered = np.bincount(owner[inside & (owner >= 0)], minlength=len(placed))
            if inside.any() and all(visible_area[j] - covered[j] >= _MIN_VISIBLE * full_area[j]
                                    for j in range(len(placed))):
                break
        else:
            if len(placed) < 2:
                raise RuntimeError(f"toyscenes: could not place two objects in {split} image {index}")
            continue
        c1, c2 = _two_colours(rng)
        image[inside] = _blend(_object_pattern(cls, u, v, radius, size / _REF_SIZE, rng), c1, c2)[inside]
        for j in range(len(placed)):
            visible_area[j] -= covered[j]
        owner[inside] = len(placed)
        full_area.append(int(inside.sum()))
        visible_area.append(full_area[-1])
        placed.append(cls)

    instances = []
    for k, cls in enumerate(placed):
        visible = owner == k
        labels[visible] = len(STUFF_CLASSES) + cls
        instances.append({"category_id": len(STUFF_CLASSES) + cls, "mask": visible})

    # a one-pixel void band along the inside of object outlines, as Pascal VOC marks its borders
    obj = labels >= len(STUFF_CLASSES)
    padded = np.pad(labels, 1, mode="edge")
    border = np.zeros_like(obj)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        border |= obj & (padded[dy:dy + size, dx:dx + size] != labels)
    labels[border] = IGNORE_INDEX

    image += rng.normal(0, 6, image.shape)  # sensor noise
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5))
    return np.asarray(picture), labels, instances


def _voc_palette() -> list[int]:
    """The Pascal VOC colour map (bit-interleaved class ids), with white for the void label."""
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


_PALETTE = _voc_palette()


def _write_one(job: tuple[Path, int, str, int, int]) -> list[dict]:
    root, seed, split, index, size = job
    image_id = f"{split}_{index:06d}"
    image, labels, instances = render_scene(seed, split, index, size)
    Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    png = Image.fromarray(labels)
    png.putpalette(_PALETTE)  # turns the "L" image into a "P" one
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


def _check_args(num_train: int, num_val: int, image_size: int, seed: int, workers: int) -> None:
    for name, value, low, high in (("num_train", num_train, 1, 10**7), ("num_val", num_val, 1, 10**7),
                                   ("image_size", image_size, 32, 1024), ("seed", seed, 0, 2**63 - 1),
                                   ("workers", workers, 1, 1024)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            raise ValueError(f"toyscenes: {name} must be an integer in [{low}, {high}], got {value!r}")


def _check_existing(root: Path, params: dict) -> None:
    """Accept an existing dataset generated alike; refuse anything else, naming the difference."""
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("name") != "toyscenes":
        raise FileExistsError(f"{root} exists but holds no toyscenes dataset (no valid meta.json); "
                              "remove it or pick another folder")
    wanted = {**params, "generator_version": GENERATOR_VERSION}
    differing = [f"{k} (existing {meta.get(k)!r}, requested {v!r})" for k, v in wanted.items() if meta.get(k) != v]
    if differing:
        raise FileExistsError(f"{root} holds toyscenes generated with other settings: "
                              f"{', '.join(differing)}; remove it or pick another folder")


def generate(root: str | Path, num_train: int = 2000, num_val: int = 200, image_size: int = 112,
             seed: int = 0, workers: int = 2, progress: bool = True) -> Path:
    """Generate the toyscenes dataset into ``root`` and return ``root`` as a :class:`Path`.

    The dataset is written into a temporary sibling folder and renamed to ``root`` at the end, so
    an interrupted run never leaves a complete-looking dataset. An existing ``root`` generated with
    the same parameters is returned as is; one generated otherwise raises :class:`FileExistsError`
    naming the differing key. Bad arguments raise :class:`ValueError` naming the argument and its
    allowed range. ``workers > 1`` renders in that many processes; the files do not depend on it.
    """
    _check_args(num_train, num_val, image_size, seed, workers)
    root = Path(root)
    params = {"num_train": int(num_train), "num_val": int(num_val), "image_size": int(image_size), "seed": int(seed)}
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):
        _check_existing(root, params)
        return root

    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "annotations"):
        (tmp / sub).mkdir(parents=True)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for split, count in (("train", params["num_train"]), ("val", params["num_val"])):
            jobs = [(tmp, params["seed"], split, i, params["image_size"]) for i in range(count)]
            mapped = pool.map(_write_one, jobs, chunksize=16) if pool else map(_write_one, jobs)
            results = list(_progress(mapped, count, split, progress))
            ids = [f"{split}_{i:06d}" for i in range(count)]
            for name in ([split, "trainaug"] if split == "train" else [split]):
                (tmp / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
            _write_coco(tmp / "annotations" / f"instances_{split}.json", ids, results, params["image_size"])
        meta = {"name": "toyscenes", "classes": list(CLASS_NAMES), "stuff_classes": list(STUFF_CLASSES),
                "num_classes": len(CLASS_NAMES), "ignore_index": IGNORE_INDEX,
                "generator_version": GENERATOR_VERSION, **params}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, root)  # atomic; also replaces an empty placeholder folder
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def _progress(iterable, total: int, split: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
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
