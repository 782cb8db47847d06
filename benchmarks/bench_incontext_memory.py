"""Peak host memory of the in-context evaluation at the full protocol's scale, measured at 1/8.

The full ViT-S ADE20K protocol: a memory of 10,240,000 patches (D = 384, C = 151 classes, 2
augmented passes over 20,210 images) queried by 2,000 validation images of 32 x 32 patches.
open-hummingbird-eval keeps features and labels in float32 (15.7 GB + 6.2 GB) plus the faiss copy.
Here the training store is float16 with uint16 label counts, the memory is float16 with uint16
counts, and the exact search converts one slice at a time (``cribo.eval.search``).

This script writes a synthetic training store of ``1/scale`` of the memory (images of 1,024
patches, a few classes each, as in real masks), then runs ``evaluate_incontext`` with
``memory_size = 10,240,000 / scale`` on ``--val-images`` query images, and prints the peak RSS
(``ru_maxrss``) with its parts, and the projection to full scale (everything but the queries
scales with the memory).

Usage: python benchmarks/bench_incontext_memory.py [--scale 8 --val-images 8]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


EVALUATE = """
import resource, sys, threading, time
import numpy as np
from cribo.eval.incontext import evaluate_incontext
peak_anon = [0]
def sample():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
folder, memory_size, val_images, classes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
feats = np.load(folder + "/f.npy", mmap_mode="r")
counts = np.load(folder + "/c.npy", mmap_mode="r")
rng = np.random.default_rng(1)
val = rng.standard_normal((val_images, 1024, feats.shape[2]), dtype=np.float32).astype(np.float16)
masks = rng.integers(0, classes, size=(val_images, 512, 512)).astype(np.uint8)
start = time.perf_counter()
result = evaluate_incontext(feats, counts, val, masks, (32, 32), classes, k=30, temperature=0.02,
                            memory_size=memory_size, seed=0)
time.sleep(0.1)
print(result["memory_entries"], peak_anon[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      time.perf_counter() - start)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--val-images", type=int, default=8)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=151)
    args = parser.parse_args()
    memory_size = 10_240_000 // args.scale
    passes_images = 2 * 20_210 // args.scale  # memory rows: images x passes
    n, d, c = 1024, args.dim, args.classes
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        feats = np.lib.format.open_memmap(Path(tmp) / "f.npy", "w+", np.float16, (passes_images, n, d))
        counts = np.lib.format.open_memmap(Path(tmp) / "c.npy", "w+", np.uint16, (passes_images, n, c))
        for s in range(0, passes_images, 256):
            e = min(s + 256, passes_images)
            feats[s:e] = rng.standard_normal((e - s, n, d), dtype=np.float32).astype(np.float16)
            labels = rng.integers(0, c, size=(e - s, n))
            block = np.zeros((e - s, n, c), np.uint16)
            np.put_along_axis(block, labels[..., None], 256, axis=2)
            counts[s:e] = block
        feats.flush(), counts.flush()
        store_gib = (feats.nbytes + counts.nbytes) / 2**30
        del feats, counts
        # a fresh process: the pages written above must not count as the evaluation's memory
        out = subprocess.run([sys.executable, "-c", EVALUATE, tmp, str(memory_size), str(args.val_images), str(c)],
                             check=True, capture_output=True, text=True).stdout.split()
    entries, anon_kib, maxrss_kib, seconds = int(out[0]), int(out[1]), int(out[2]), float(out[3])
    mem_gib = entries * (d * 2 + c * 2) / 2**30
    print(f"1/{args.scale} scale: training store {store_gib:.2f} GiB on disk (memory-mapped, read in chunks), memory "
          f"{entries:,} entries = {mem_gib:.2f} GiB (fp16 features + uint16 counts), {args.val_images} query images, "
          f"{seconds:.0f} s")
    print(f"peak anonymous memory {anon_kib / 2**20:.2f} GiB; peak RSS incl. mapped file pages (reclaimable) "
          f"{maxrss_kib / 2**20:.2f} GiB")
    # what scales with the memory: the memory itself and the selection's bookkeeping; one search slice does not
    slice_gib = 2**20 * d * 4 / 2**30
    projected = (anon_kib / 2**20 - slice_gib) * args.scale + slice_gib
    print(f"projected full scale (ViT-S, ADE20K, 10.24M entries): {projected:.1f} GiB of anonymous memory "
          f"(everything x {args.scale} except one {slice_gib:.1f} GiB search slice); "
          f"open-hummingbird-eval keeps 15.7 GiB features + 6.2 GiB labels in float32, plus the index copy")


if __name__ == "__main__":
    main()
