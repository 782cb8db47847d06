"""Prepare-stage throughput on synthetic extracted archives at real image sizes, and projections.

Usage: python benchmarks/bench_prepare.py [--images 200] [--workers 1 2] [--repeats 3]

Builds, in a temporary folder, the extracted layout of each source at the real datasets' image
sizes (COCO 640 x 480: stuff pixel maps, RGB panoptic PNGs with 12 segments, stuffthingmaps;
VOC 500 x 375: SBD .mat masks) and times ``cribo.data.prepare`` per variant (median of repeats,
each from scratch). Then projects the wall time of the real dataset on one 16-core node,
assuming the per-image cost scales with cores (the stage is CPU-bound: PNG decode / encode), and
the disk the dataset takes (archives + extracted + prepared masks, masks at the measured size).
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cribo.data.prepare import prepare
from cribo.data.registry import ARCHIVES, PREPARED

REAL_COUNTS = {"coco-stuff15": 123_287, "coco-things12": 123_287, "coco-stuff171": 123_287, "voc": 10_582}
NODE_CORES = 16


def _build(raw: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    h, w = 480, 640
    stuff_categories = [{"id": i, "name": f"s{i}", "supercategory": ["sky", "wall", "plant", "other"][i % 4]}
                        for i in range(92, 184)]
    things = [{"id": i, "name": f"t{i}", "supercategory": "animal", "isthing": 1} for i in range(1, 13)]
    for split, count in (("train", n), ("val", max(1, n // 10))):
        images = raw / f"coco_{split}2017" / f"{split}2017"
        pix = raw / "coco_stuff_annotations" / "annotations" / f"stuff_{split}2017_pixelmaps"
        pan = raw / "coco_panoptic_annotations" / "annotations" / f"panoptic_{split}2017"
        stm = raw / "coco_stuffthingmaps" / f"{split}2017"
        for d in (images, pix, pan, stm):
            d.mkdir(parents=True, exist_ok=True)
        annotations = []
        for i in range(count):
            name = f"{i:012d}"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.jpg")
            blocks = rng.integers(92, 184, (6, 8)).astype(np.uint8)  # piecewise-constant label maps
            Image.fromarray(np.kron(blocks, np.ones((80, 80), np.uint8))).save(pix / f"{name}.png")
            Image.fromarray(np.kron(blocks - 1, np.ones((80, 80), np.uint8))).save(stm / f"{name}.png")
            seg = np.kron(rng.integers(1, 13, (6, 8)), np.ones((80, 80), np.int64))
            rgb = np.stack([seg % 256, seg // 256, seg * 0], -1).astype(np.uint8)
            Image.fromarray(rgb).save(pan / f"{name}.png")
            annotations.append({"file_name": f"{name}.png",
                                "segments_info": [{"id": s, "category_id": s} for s in range(1, 13)]})
        ann = raw / "coco_panoptic_annotations" / "annotations"
        (ann / f"panoptic_{split}2017.json").write_text(json.dumps({"categories": things, "annotations": annotations}))
        (pan / ".extracted").write_text("")
        (pix / ".extracted").write_text("")
    (raw / "coco_stuff_annotations" / "annotations" / "stuff_val2017.json").write_text(
        json.dumps({"categories": stuff_categories}))
    # VOC + SBD at 500 x 375
    from scipy.io import savemat

    voc = raw / "voc2012" / "VOCdevkit" / "VOC2012"
    sbd = raw / "sbd" / "benchmark_RELEASE" / "dataset"
    for d in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation", sbd / "cls"):
        d.mkdir(parents=True, exist_ok=True)
    ids = [f"2008_{i:06d}" for i in range(n)]
    for image_id in ids:
        mask = np.kron(rng.integers(0, 21, (5, 5)), np.ones((75, 100), np.int64)).astype(np.uint8)
        savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": mask}})
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
    (sbd / "train.txt").write_text("\n".join(ids) + "\n")
    (sbd / "val.txt").write_text("")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("none\n")


def _mask_bytes(out: Path) -> float:
    sizes = [p.stat().st_size for p in (out / ("SegmentationClassAug" if (out / "SegmentationClassAug").is_dir()
                                                else "SegmentationClass")).glob("*.png")]
    return statistics.mean(sizes)


def _bench_extract(raw: Path, tmp: Path, repeats: int) -> None:
    """Safe extraction rate of a zip of the synthetic JPEGs, projected to the big archives."""
    import zipfile

    from cribo.data.extract import extract

    archive = tmp / "train2017.zip"
    with zipfile.ZipFile(archive, "w") as z:  # JPEGs are stored, as in COCO's zips
        for p in sorted((raw / "coco_train2017" / "train2017").glob("*.jpg")):
            z.write(p, f"train2017/{p.name}")
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        extract(archive, tmp / f"x{r}")
        times.append(time.perf_counter() - start)
    rate = archive.stat().st_size / statistics.median(times) / 1e6
    projections = ", ".join(f"{ARCHIVES[a].filename} {ARCHIVES[a].approx_bytes / 1e6 / rate / 60:.1f} min"
                            for a in ("coco_train2017", "voc2012", "ade20k"))
    print(f"[extract] {archive.stat().st_size / 1e6:.1f} MB zip: {rate:.0f} MB/s (one process, median of "
          f"{repeats}); projected (this disk): {projections}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        _build(raw, args.images)
        _bench_extract(raw, Path(tmp), args.repeats)
        for variant, real in REAL_COUNTS.items():
            images = args.images + (max(1, args.images // 10) if variant != "voc" else 0)
            rates = {}
            for workers in args.workers:
                times = []
                for r in range(args.repeats):
                    out = Path(tmp) / f"{variant}-{workers}-{r}"
                    start = time.perf_counter()
                    prepare(variant, raw, out, workers=workers, progress=False)
                    times.append(time.perf_counter() - start)
                    if r < args.repeats - 1:
                        shutil.rmtree(out)
                rates[workers] = images / statistics.median(times)
            mask_kb = _mask_bytes(out) / 1024
            per_core = rates[args.workers[0]] / args.workers[0]
            hours = real / (per_core * NODE_CORES) / 3600
            archives = sum(ARCHIVES[a].approx_bytes for a in PREPARED[variant]) / 1e9
            disk = 2 * archives + real * mask_kb * 1024 / 1e9
            rate_text = " / ".join(f"{rates[w]:.0f}" for w in args.workers)
            print(f"[{variant}] {images} images: {rate_text} images/s with {args.workers} worker(s); "
                  f"masks {mask_kb:.1f} KiB; projected {real:,} images on {NODE_CORES} cores: "
                  f"{hours * 60:.1f} min, disk {disk:.1f} GB (archives {archives:.1f} GB kept + extracted + masks)")


if __name__ == "__main__":
    main()
