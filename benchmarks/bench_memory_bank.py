"""Object memory bank at the official scale: retrieval (both directions + cycle checks) and enqueue.

Default: ViT-S width 384, K=32 objects x 25,000 images = 800,000 paired entries, a batch of 128
images with 20 valid objects each. Prints ms per step (median of --repeats) and the bank's memory.

Usage: python benchmarks/bench_memory_bank.py [--images 25000 --objects 32 --dim 384 --batch 128]
"""

import argparse
import statistics
import time

import torch

from cribo.method.memory_bank import ObjectMemoryBank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=25000)
    parser.add_argument("--objects", type=int, default=32)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--valid-per-image", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    bank = ObjectMemoryBank(args.images, args.objects, args.dim, generator=g)
    m = args.batch * args.valid_per_image
    counts = torch.full((args.batch,), args.valid_per_image)
    retrieve, enqueue = [], []
    for _ in range(args.repeats):
        q1, q2 = torch.randn(m, args.dim, generator=g), torch.randn(m, args.dim, generator=g)
        start = time.perf_counter()
        bank.retrieve(q1, q2)
        retrieve.append(time.perf_counter() - start)
        start = time.perf_counter()
        bank.enqueue(q1, q2, counts)
        enqueue.append(time.perf_counter() - start)
    flops = 2 * 2 * m * bank.num_valid * args.dim
    r = statistics.median(retrieve)
    print(f"bank {args.images} images x {args.objects} objects = {bank.capacity:,} paired entries of {args.dim} dims "
          f"({2 * 2 * bank.capacity * args.dim * 4 / 2**30:.2f} GiB with its normalised copy)")
    print(f"batch {args.batch} images x {args.valid_per_image} objects = {m} queries per view; {args.threads} threads")
    print(f"retrieve (2 directions + cycle checks): {r * 1000:.0f} ms/step ({flops / r / 1e9:.0f} GFLOP/s); "
          f"enqueue: {statistics.median(enqueue) * 1000:.1f} ms/step (median of {args.repeats})")


if __name__ == "__main__":
    main()
