"""Prepare downloaded archives into the layouts the loaders read.

Input: each archive of :data:`cribo.data.registry.ARCHIVES` extracted into its own folder,
``RAW/<archive name>/`` (what ``cribo data download`` does). Output: one folder per dataset.

- ``voc``: Pascal VOC 2012 with the 10,582-image ``trainaug`` split: ``SegmentationClassAug/`` holds
  the VOC mask where VOC has one and SBD's ``cls/<id>.mat`` (``GTcls.Segmentation``, read with scipy)
  otherwise; ``trainaug`` = (SBD train + SBD val + VOC train) - VOC val. Images and the original
  masks are linked, not copied.
- ``voc2007``: VOC 2007 trainval + test image-level labels from the annotations (:mod:`cribo.data.voc07`).
- ``ade20k``: ADEChallengeData2016 as is (linked); images and annotations are checked to pair up.
- ``coco-stuff15`` / ``coco-things12`` / ``coco-stuff171``: masks written as single-channel PNGs by
  :mod:`cribo.data.coco`, images linked, in the VOC layout (``train`` / ``val`` lists).
- ``coco``: train2017 + val2017 images linked into one folder of unlabelled images (pretraining).
- ``pascal-context``: VOC2010 images (linked) with 59-class masks drawn from the Detail API JSON
  ``trainval_merged.json`` (the file mmsegmentation's converter reads): each image's segmentation
  annotations (COCO RLE, decoded with pycocotools) painted in file order with their category id,
  the 59 ids of ``registry.PASCAL_CONTEXT_IDS`` mapped to 0-58 in sorted order, everything else
  (background, id 0) to the ignore label 255; ``train`` / ``val`` lists from the images' phase.

Every output file is written under a temporary name and renamed, existing outputs are kept (a
killed preparation resumes), and ``.prepared.json`` (counts, seconds) is written last: its
presence is the completion marker the DAG waits for.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cribo.data import coco
from cribo.data.segmentation import DataError

MARKER = ".prepared.json"


def is_prepared(out: str | Path) -> bool:
    return (Path(out) / MARKER).is_file()


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found: {path} (run `cribo data download` first, or check --raw)")
    return path


def _link(target: Path, link: Path) -> None:
    """Relative symlink ``link -> target`` (replaced if it points elsewhere)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == rel:
            return
        link.unlink()
    tmp = link.with_name(link.name + ".tmp-link")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(rel, tmp)
    os.replace(tmp, link)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(mask.astype(np.uint8), mode="L").save(tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finish(out: Path, started: float, **counts) -> dict:
    info = {**counts, "seconds": round(time.time() - started, 3)}
    _write_text(out / MARKER, json.dumps(info, indent=1) + "\n")
    return info


def _map(fn, items: list, workers: int, desc: str, progress: bool) -> list:
    """``fn`` over ``items`` in ``workers`` processes (in this process when 1), with a progress bar."""
    bar = dict(desc=desc, total=len(items), disable=not progress, file=sys.stdout, mininterval=5)
    if workers <= 1 or len(items) < 64:
        return [fn(item) for item in tqdm(items, **bar)]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(fn, items, chunksize=64), **bar))


# ---------------------------------------------------------------- Pascal VOC + SBD


def _sbd_mask(mat_path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        return np.asarray(loadmat(mat_path)["GTcls"][0]["Segmentation"][0], dtype=np.uint8)
    except (OSError, KeyError, IndexError, ValueError) as err:
        raise DataError(f"cannot read the SBD mask {mat_path} ({err})") from err


def _voc_trainaug_one(item, voc: Path, sbd: Path, out: Path) -> str:
    image_id, = item
    dest = out / "SegmentationClassAug" / f"{image_id}.png"
    if dest.is_file():
        return "kept"
    voc_mask = voc / "SegmentationClass" / f"{image_id}.png"
    if voc_mask.is_file():
        with Image.open(voc_mask) as img:
            mask = np.array(img)  # palette indices are the class ids
        source = "voc"
    else:
        mask = _sbd_mask(sbd / "cls" / f"{image_id}.mat")
        source = "sbd"
    _save_mask(mask, dest)
    return source


def prepare_voc(raw: Path, out: Path, workers: int = 1, progress: bool = True) -> dict:
    started = time.time()
    voc = _need(raw / "voc2012" / "VOCdevkit" / "VOC2012", "Pascal VOC 2012 folder")
    sbd = _need(raw / "sbd" / "benchmark_RELEASE" / "dataset", "SBD folder")
    sets = voc / "ImageSets" / "Segmentation"

    def ids(path: Path) -> list[str]:
        return [line.strip() for line in _need(path, "split list").read_text().splitlines() if line.strip()]

    voc_train, voc_val = ids(sets / "train.txt"), ids(sets / "val.txt")
    sbd_ids = ids(sbd / "train.txt") + ids(sbd / "val.txt")
    trainaug = sorted(set(sbd_ids + voc_train) - set(voc_val))
    out.mkdir(parents=True, exist_ok=True)
    _link(voc / "JPEGImages", out / "JPEGImages")
    _link(voc / "SegmentationClass", out / "SegmentationClass")
    (out / "SegmentationClassAug").mkdir(exist_ok=True)
    sources = _map(partial(_voc_trainaug_one, voc=voc, sbd=sbd, out=out), [(i,) for i in trainaug], workers,
                   "voc trainaug masks", progress)
    for split, split_ids in (("train", voc_train), ("val", voc_val), ("trainaug", trainaug)):
        _write_text(out / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(split_ids) + "\n")
    _write_text(out / "meta.json", json.dumps({"classes": list(_voc_classes())}, indent=1) + "\n")
    return _finish(out, started, trainaug=len(trainaug), val=len(voc_val), from_voc=sources.count("voc"),
                   from_sbd=sources.count("sbd"))


def _voc_classes():
    from cribo.data.registry import VOC_CLASSES

    return VOC_CLASSES


# ---------------------------------------------------------------- ADE20K


def prepare_ade(raw: Path, out: Path, workers: int = 1, progress: bool = True) -> dict:
    started = time.time()
    root = _need(raw / "ade20k" / "ADEChallengeData2016", "ADEChallengeData2016 folder")
    counts = {}
    for split in ("training", "validation"):
        images = {p.stem for p in _need(root / "images" / split, "ADE20K images").glob("*.jpg")}
        masks = {p.stem for p in _need(root / "annotations" / split, "ADE20K annotations").glob("*.png")}
        if images != masks:
            missing = sorted(images ^ masks)[:5]
            raise DataError(f"ADE20K {split}: {len(images)} images but {len(masks)} masks; unpaired: {missing}")
        counts[split] = len(images)
    if out.is_symlink() or not out.exists():
        _link(root, out)
    return _finish(root, started, **counts)


# ---------------------------------------------------------------- COCO


def _extract_inner_zip(archive: Path, dest_parent: Path, progress: bool) -> Path:
    """The annotation archives hold their PNGs in an inner zip; extract it once (safely)."""
    from cribo.data.extract import extract

    dest = dest_parent / archive.stem
    if not (dest / ".extracted").is_file():
        _need(archive, "inner archive")
        extract(archive, dest_parent / (archive.stem + ".unzipped"), progress=progress)
        inner = dest_parent / (archive.stem + ".unzipped")
        # the zip holds one top folder named like the archive; move it into place
        top = inner / archive.stem if (inner / archive.stem).is_dir() else inner
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        os.replace(top, dest)
        if inner.exists():
            inner.rmdir()
        (dest / ".extracted").write_text("")
    return dest


def _coco_one(item, variant: str, out: Path, table) -> str:
    name, image_path, source = item
    dest = out / "SegmentationClass" / f"{name}.png"
    _link(Path(image_path), out / "JPEGImages" / f"{name}.jpg")
    if dest.is_file():
        return name
    if variant == "coco-things12":
        png, segments = source
        with Image.open(png) as img:
            mask = coco.things12_mask(np.asarray(img.convert("RGB")), segments, table)
    else:
        with Image.open(source) as img:
            values = np.asarray(img)
        if values.ndim != 2:
            raise DataError(f"{source} is not a single-channel label map (mode {img.mode})")
        mask = table[values]
    _save_mask(mask, dest)
    return name


def prepare_coco(raw: Path, out: Path, variant: str, workers: int = 1, progress: bool = True) -> dict:
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        images_dir = _need(raw / f"coco_{split}2017" / f"{split}2017", f"COCO {split}2017 images")
        if variant == "coco-stuff15":
            ann = raw / "coco_stuff_annotations" / "annotations"
            categories = json.loads(_need(ann / "stuff_val2017.json", "COCO stuff annotations").read_text())["categories"]
            table = coco.stuff15_lut(categories)
            maps = _extract_inner_zip(ann / f"stuff_{split}2017_pixelmaps.zip", ann, progress)
            items = [(p.stem, str(images_dir / f"{p.stem}.jpg"), str(p)) for p in sorted(maps.glob("*.png"))]
        elif variant == "coco-stuff171":
            maps = _need(raw / "coco_stuffthingmaps" / f"{split}2017", "COCO stuffthingmaps")
            table = coco.stuff171_lut()
            items = [(p.stem, str(images_dir / f"{p.stem}.jpg"), str(p)) for p in sorted(maps.glob("*.png"))]
        elif variant == "coco-things12":
            ann = raw / "coco_panoptic_annotations" / "annotations"
            panoptic = json.loads(_need(ann / f"panoptic_{split}2017.json", "COCO panoptic annotations").read_text())
            table = coco.things12_map(panoptic["categories"])
            pngs = _extract_inner_zip(ann / f"panoptic_{split}2017.zip", ann, progress)
            items = [(Path(a["file_name"]).stem, str(images_dir / f"{Path(a['file_name']).stem}.jpg"),
                      (str(pngs / a["file_name"]), a["segments_info"])) for a in panoptic["annotations"]]
        else:
            raise ValueError(f"unknown COCO variant {variant!r}")
        missing = [i[1] for i in items if not Path(i[1]).is_file()]
        if missing:
            raise DataError(f"{len(missing)} images of the {variant} {split} masks are missing, e.g. {missing[0]}")
        (out / "SegmentationClass").mkdir(exist_ok=True)
        names = _map(partial(_coco_one, variant=variant, out=out, table=table), items, workers,
                     f"{variant} {split}", progress)
        _write_text(out / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(sorted(names)) + "\n")
        counts[split] = len(names)
    classes = {"coco-stuff15": coco.STUFF15_CLASSES, "coco-things12": coco.THINGS12_CLASSES}.get(variant)
    if classes:
        _write_text(out / "meta.json", json.dumps({"classes": list(classes)}, indent=1) + "\n")
    return _finish(out, started, **counts)


# ---------------------------------------------------------------- Pascal Context (59 classes)


def pascal_context_mask(height: int, width: int, segments: list[dict]) -> np.ndarray:
    """``H x W`` uint8 59-class mask of one image from its Detail segmentation annotations
    (``{"category_id", "segmentation": COCO RLE}``): later annotations paint over earlier ones."""
    from pycocotools import mask as rle_mask

    from cribo.data.registry import PASCAL_CONTEXT_IDS

    ids = np.zeros((height, width), dtype=np.int64)
    for segment in segments:
        rle = dict(segment["segmentation"])
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            rle = rle_mask.frPyObjects(rle, height, width)
        elif isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode()
        pixels = rle_mask.decode(rle).astype(bool)
        if pixels.shape != (height, width):
            raise DataError(f"a segmentation of category {segment['category_id']} is {pixels.shape[1]}x"
                            f"{pixels.shape[0]}, its image {width}x{height}")
        ids[pixels] = segment["category_id"]
    lookup = np.full(max(int(ids.max()), max(PASCAL_CONTEXT_IDS)) + 1, 255, dtype=np.uint8)
    lookup[list(PASCAL_CONTEXT_IDS)] = np.arange(len(PASCAL_CONTEXT_IDS), dtype=np.uint8)
    return lookup[ids]


def prepare_pascal_context(raw: Path, out: Path, workers: int = 1, progress: bool = True) -> dict:
    started = time.time()
    voc = _need(raw / "voc2010" / "VOCdevkit" / "VOC2010", "Pascal VOC 2010 folder")
    annotations = _need(raw / "pascal_context_annotations" / "trainval_merged.json", "Pascal Context annotations")
    try:
        data = json.loads(annotations.read_text())
        images = {img["image_id"]: img for img in data["images"]}
        segments: dict = {}
        for segment in data["annos_segmentation"]:
            segments.setdefault(segment["image_id"], []).append(segment)
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{annotations} is not the Detail API's trainval_merged.json ({err!r})") from err
    out.mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClass").mkdir(exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for image_id, img in tqdm(sorted(images.items()), desc="pascal-context masks", disable=not progress,
                              file=sys.stdout, mininterval=5):
        phase = img.get("phase")
        if phase not in splits:
            continue
        stem = Path(img["file_name"]).stem
        source = _need(voc / "JPEGImages" / img["file_name"], "VOC2010 image")
        _link(source, out / "JPEGImages" / f"{stem}.jpg")
        dest = out / "SegmentationClass" / f"{stem}.png"
        if not dest.is_file():
            _save_mask(pascal_context_mask(img["height"], img["width"], segments.get(image_id, [])), dest)
        splits[phase].append(stem)
    for split, ids in splits.items():
        _write_text(out / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(sorted(ids)) + "\n")
    from cribo.data.registry import PASCAL_CONTEXT_CLASSES

    _write_text(out / "meta.json", json.dumps({"classes": list(PASCAL_CONTEXT_CLASSES)}, indent=1) + "\n")
    return _finish(out, started, train=len(splits["train"]), val=len(splits["val"]))


def prepare_coco_images(raw: Path, out: Path, workers: int = 1, progress: bool = True) -> dict:
    """COCO train2017 + val2017 as one folder of unlabelled images (links), for pretraining."""
    started = time.time()
    counts = {}
    for split in ("train", "val"):
        images_dir = _need(raw / f"coco_{split}2017" / f"{split}2017", f"COCO {split}2017 images")
        _link(images_dir, out / f"{split}2017")
        counts[split] = sum(1 for _ in images_dir.glob("*.jpg"))
    return _finish(out, started, **counts)


def prepare_coco_instances(raw: Path, out: Path, workers: int = 1, progress: bool = True) -> dict:
    """COCO 2017 for detection: ``train2017/``, ``val2017/`` (links) and ``annotations/instances_{train,val}2017.json``
    (links), the files `cribo eval detect` reads; each split's annotation file must name images of its folder."""
    started = time.time()
    counts = {}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        images_dir = _need(raw / f"coco_{split}2017" / f"{split}2017", f"COCO {split}2017 images")
        ann = _need(raw / "coco_annotations" / "annotations" / f"instances_{split}2017.json",
                    f"COCO instances_{split}2017.json")
        _link(images_dir, out / f"{split}2017")
        _link(ann, out / "annotations" / ann.name)
        data = json.loads(ann.read_text())
        names = [image["file_name"] for image in data.get("images", [])]
        if names and not (images_dir / names[0]).is_file():
            raise DataError(f"{ann} names {names[0]}, which is not in {images_dir}: are the images and the "
                            "annotations of the same COCO release?")
        counts[split] = len(names)
        counts[f"{split}_instances"] = len(data.get("annotations", []))
    return _finish(out, started, **counts)


def prepare(name: str, raw: str | Path, out: str | Path, workers: int = 1, progress: bool = True,
            force: bool = False) -> dict:
    """Prepare dataset ``name`` from the archives extracted under ``raw`` into ``out``."""
    raw, out = Path(raw), Path(out)
    if is_prepared(out) and not force:
        return json.loads((out / MARKER).read_text())
    if name == "voc":
        return prepare_voc(raw, out, workers, progress)
    if name == "ade20k":
        return prepare_ade(raw, out, workers, progress)
    if name == "voc2007":
        from cribo.data.voc07 import prepare_voc2007

        return prepare_voc2007(raw, out, workers, progress)
    if name in ("coco-stuff15", "coco-things12", "coco-stuff171"):
        return prepare_coco(raw, out, name, workers, progress)
    if name == "coco":
        return prepare_coco_images(raw, out, workers, progress)
    if name == "coco-instances":
        return prepare_coco_instances(raw, out, workers, progress)
    if name == "pascal-context":
        return prepare_pascal_context(raw, out, workers, progress)
    raise ValueError(f"no prepare step for {name!r}; preparable: voc, voc2007, ade20k, coco, coco-instances, coco-stuff15, coco-things12, "
                     "coco-stuff171, pascal-context (imagenet and cityscapes are user-provided: `cribo data check`)")
