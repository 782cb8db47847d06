"""``toyscenes``: the embedded dataset, generated deterministically on any machine.

Scene-centric images in the spirit of COCO at toy scale: each image has one or two background
"stuff" regions and two or three objects of distinct classes that may partly occlude each other.

- Stuff classes (ids 0-2): ``waves`` (horizontal stripes), ``gravel`` (speckle), ``tiles`` (grid).
- Object classes (ids 3-8), each its own shape *and* texture: ``disk`` (vertical stripes),
  ``square`` (checker), ``triangle`` (dots), ``star`` (crosshatch), ``cross`` (plain),
  ``hexagon`` (one diagonal).

Every colour, of stuff and objects alike, is drawn from one palette shared by all classes (two
per region), so class identity cannot be read from colour: it lies in texture and shape. Textures
sit at the scale of a patch (periods of 3-6 px at 64 px, scaled with the image size), so a patch
of 8 px can tell its class once a network looks past colour; raw pixels and an untrained network
mostly match colours. That gap is what the toy table measures: what pretraining taught the network
to see. Orientation cues survive a horizontal flip (horizontal/vertical stripes, both diagonals
in one texture, one diagonal either way), so no pretraining augmentation maps a class onto another.
(Generator version 2, with object-frame textures and 112 px images, left every run at the floors
within the demo's budget: even a supervised backbone barely learned it in a hundred steps.)

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
from PIL import Image
from pycocotools import mask as mask_utils

STUFF_CLASSES = ("waves", "gravel", "tiles")
OBJECT_CLASSES = ("disk", "square", "triangle", "star", "cross", "hexagon")
# the texture of each class, in class-id order (stuff, then objects)
TEXTURES = ("hstripes", "speckle", "grid", "vstripes", "checker", "dots", "crosshatch", "plain", "diagonal")
CLASS_NAMES = STUFF_CLASSES + OBJECT_CLASSES
IGNORE_INDEX = 255
# Version 3: one patch-scale texture per class in image coordinates, 2-3 larger objects, no blur.
# (Version 2: object-frame textures; version 1 differs in pixels.)
GENERATOR_VERSION = 3
_SPLIT_CODES = {"train": 1, "val": 2}
_MIN_VISIBLE = 0.5  # every object keeps at least half of its area after occlusion
_PLACEMENT_TRIES = 50
_REF_SIZE = 64.0  # texture periods below are in pixels at this image size and scale with it
_MIN_PERIOD = 3.0  # no texture finer than this many pixels: it would alias into noise


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


# ---------------- textures: one per class, at the scale of a patch ----------------
#
# Every class has its own texture, drawn in image coordinates with a random phase and period, in
# two colours of the shared palette. Textures are what tells classes apart: a patch of 8 px holds
# one or two periods of any of them, so a network can read its class locally once it ignores
# colour. Orientations are chosen so that a horizontal flip (a pretraining augmentation) maps
# every texture to its own class: horizontal and vertical stripes, both diagonals together.

def _stripes(axis: np.ndarray, period: float, rng: np.random.Generator, duty: float = 0.5) -> np.ndarray:
    return (((axis / period + rng.uniform(0, 1)) % 1.0) < duty).astype(np.float64)


def _texture(name: str, ys: np.ndarray, xs: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``H x W`` pattern in [0, 1] of texture ``name`` (mixed with two colours by :func:`_blend`)."""
    if name == "hstripes":
        return _stripes(ys, _period(rng, 4.0, 5.5, scale), rng)
    if name == "vstripes":
        return _stripes(xs, _period(rng, 4.0, 5.5, scale), rng)
    if name == "checker":
        cell = _period(rng, 4.0, 5.5, scale) / 2
        oy, ox = rng.uniform(0, 2 * cell, size=2)
        return ((np.floor((ys + oy) / cell) + np.floor((xs + ox) / cell)) % 2).astype(np.float64)
    if name == "crosshatch":  # both diagonals: thin lines on a plain ground
        p = _period(rng, 5.0, 6.5, scale)
        return np.maximum(_stripes(xs + ys, p, rng, 0.3), _stripes(xs - ys, p, rng, 0.3))
    if name == "grid":  # horizontal and vertical thin lines
        p = _period(rng, 5.0, 6.5, scale)
        return np.maximum(_stripes(xs, p, rng, 0.3), _stripes(ys, p, rng, 0.3))
    if name == "dots":
        p = _period(rng, 4.5, 6.0, scale)
        oy, ox = rng.uniform(0, p, size=2)
        return (((((ys + oy) / p) % 1 - 0.5) ** 2 + (((xs + ox) / p) % 1 - 0.5) ** 2) < 0.09).astype(np.float64)
    if name == "speckle":  # random cells of 2 px: fine grain without orientation
        cell = max(2.0, 2.0 * scale)
        size = ys.shape[0]
        cells = int(np.ceil(size / cell)) + 1
        grain = rng.random((cells, cells)) < 0.5
        return grain[(ys / cell).astype(int), (xs / cell).astype(int)].astype(np.float64)
    if name == "plain":  # no texture is this class's cue; a random mix of its two colours, since a pure
        # palette colour would make its mean colour stand out from the textures' two-colour averages
        return np.full_like(ys, rng.uniform(0.0, 1.0))
    if name == "diagonal":  # one diagonal, either way (a flip maps one onto the other)
        p = _period(rng, 4.0, 5.5, scale)
        return _stripes(xs + ys if rng.random() < 0.5 else xs - ys, p, rng)
    raise ValueError(name)


# ---------------- object shapes (u, v in units of the radius) ----------------

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
        image[where] = _blend(_texture(TEXTURES[int(cls)], ys, xs, size / _REF_SIZE, rng), c1, c2)[where]
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
    classes = rng.permutation(len(OBJECT_CLASSES))[: int(rng.integers(2, 4))]
    owner = np.full((size, size), -1, np.int64)
    full_area, visible_area, placed = [], [], []
    for cls in classes:
        cls = int(cls)
        # the first two objects must be placed (at least two per image); later ones may be dropped
        tries = _PLACEMENT_TRIES * (20 if len(placed) < 2 else 1)
        for _ in range(tries):
            radius = rng.uniform(0.14, 0.26) * size
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
        pattern = _texture(TEXTURES[len(STUFF_CLASSES) + cls], ys, xs, size / _REF_SIZE, rng)
        image[inside] = _blend(pattern, c1, c2)[inside]
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
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
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
