"""Peak host memory of ORL's pairing step on a COCO-sized index (simulated), against the index size.

Writes a simulated stage-2 index for N images (COCO train2017: 118,287) with B RoIs each, as the
real steps do (kNN file, proposals shards, float16 RoI-embedding shards), then runs
`cribo.method.discovery.run_pairs` for one shard of query images and reports the peak RSS growth
(VmHWM) beside the size of all RoI embeddings. The embeddings are read image by image from the shard
files, so only the queries' and their neighbours' rows are held: the peak must stay far below the index.
Also prints the kNN step's largest buffer (a chunk of the similarity matrix). The embedding width
is scaled down (``--dim``; ResNet-50: 2048) to keep the files small; memory scales with it.

Usage: python benchmarks/bench_orl_stage2_memory.py [--images 118287 --rois 40 --dim 64 --shards 200 --k 10]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

from cribo.method.discovery import _save_npz, run_pairs, shard_range


def kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=118287)
    parser.add_argument("--rois", type=int, default=40)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, b = args.images, args.rois
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        knn = (np.arange(n)[:, None] + rng.integers(1, n, size=(n, args.k))) % n  # never self
        _save_npz(tmp / "knn.npz", image_names=np.asarray([f"{i:012d}.jpg" for i in range(n)]),
                  dataset=np.asarray("coco"), root=np.asarray("/nowhere"), knn=knn)
        props, rois = [], []
        for s in range(args.shards):
            start, stop = shard_range(n, s, args.shards)
            props.append(tmp / f"proposals-{s}.npz")
            rois.append(tmp / f"rois-{s}.npy")
            _save_npz(props[-1], start=np.asarray(start), stop=np.asarray(stop),
                      boxes=np.zeros(((stop - start) * b, 4), np.int32),
                      box_offsets=np.arange(0, (stop - start) * b + 1, b, dtype=np.int64),
                      raw_counts=np.full(stop - start, 1000), fallback=np.zeros(stop - start, bool))
            emb = rng.standard_normal(((stop - start) * b, args.dim), dtype=np.float32)
            np.save(rois[-1], (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16))
        index_bytes = n * b * args.dim * 2
        # one shard first, unmeasured: torch's first matrix product maps its kernels (a one-off)
        run_pairs(tmp / "knn.npz", props, rois, tmp / "pairs-1.npz", 1, args.shards)
        with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
            fh.write("5")
        before = kib("VmRSS")
        result = run_pairs(tmp / "knn.npz", props, rois, tmp / "pairs-0.npz", 0, args.shards)
        peak = kib("VmHWM") - before
    print(f"{n} images x {b} RoIs x {args.dim}-d float16: RoI embeddings {index_bytes / 2**20:.0f} MiB "
          f"in {args.shards} shards; ResNet-50 width (2048): {n * b * 2048 * 2 / 2**30:.1f} GiB")
    print(f"pairs for shard 0 ({result['queries']} queries x {args.k} neighbours, {result['pairs']} pairs): "
          f"peak RSS growth {peak / 1024:.1f} MiB ({peak * 1024 / index_bytes:.2%} of the index)")
    print(f"kNN step: similarity chunk 1024 x {n} float32 = {1024 * n * 4 / 2**20:.0f} MiB, "
          f"image bank {n} x 256 float32 = {n * 256 * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
