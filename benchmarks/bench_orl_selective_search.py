"""ORL stage 2c/2d on one core: selective search + box filter per image, projected to COCO train2017.

Synthetic 640 x 480 "photos" (smooth gradients, a few dozen overlapping textured ellipses and
rectangles, JPEG-like noise) stand in for COCO images (mean 640 x 480): selective search's cost grows
with the number of initial segments, so pure noise would overstate it and a flat image understate
it. Prints images/s per core, raw boxes per image, kept RoIs per image, and the core-hours that
give for COCO train2017 (118,287 images) and COCO+ (241,690). The stage is embarrassingly parallel
over images: `orl.shards` jobs (a SLURM array) divide the wall time.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_orl_selective_search.py [--images 4 --width 640 --height 480]
"""

import argparse
import os
import time

import numpy as np

from cribo.method.proposals import BoxFilter, filter_boxes, selective_search


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([(xs / width) * rng.uniform(60, 200), (ys / height) * rng.uniform(60, 200),
                      np.full_like(xs, rng.uniform(40, 160))], axis=-1)
    for _ in range(rng.integers(20, 40)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(15, width / 4), rng.uniform(15, height / 4)
        colour = rng.uniform(0, 255, 3)
        texture = rng.uniform(5, 30) * np.sin(xs / rng.uniform(3, 20) + ys / rng.uniform(3, 20))[..., None]
        mask = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1) if rng.random() < 0.5 else \
            ((abs(xs - cx) <= rx) & (abs(ys - cy) <= ry))
        image[mask] = (colour + texture)[mask]
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    args = parser.parse_args()
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: set OMP_NUM_THREADS=1 for a per-core figure")
    rng = np.random.default_rng(0)
    images = [synthetic_photo(rng, args.width, args.height) for _ in range(args.images)]
    search_s, filter_s, raw, kept = 0.0, 0.0, [], []
    for index, image in enumerate(images):
        start = time.process_time()
        boxes = selective_search(image, seed=index)
        middle = time.process_time()
        rois = filter_boxes(boxes, BoxFilter())
        search_s += middle - start
        filter_s += time.process_time() - middle
        raw.append(len(boxes))
        kept.append(len(rois))
    per_image = (search_s + filter_s) / len(images)
    print(f"{len(images)} images of {args.width}x{args.height}: selective search {search_s / len(images):.2f} s, "
          f"filter {filter_s / len(images) * 1000:.0f} ms per image (CPU time, one core)")
    print(f"raw boxes per image {np.mean(raw):.0f}, kept RoIs per image {np.mean(kept):.1f}")
    print(f"{1 / per_image:.2f} images/s per core")
    for name, count in (("COCO train2017", 118287), ("COCO+", 241690)):
        print(f"{name}: {count * per_image / 3600:.0f} core-hours ({count * per_image / 3600 / 64:.1f} h on 64 cores)")


if __name__ == "__main__":
    main()
