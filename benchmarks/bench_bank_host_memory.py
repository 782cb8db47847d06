"""Peak host memory of the CrIBo memory bank, computed and measured, for a released configuration.

The bank holds ``2 x K*Q x D`` float32 object vectors plus an L2-normalised copy (kept row by row
instead of renormalising every step); checkpointing makes one more newest-first copy
(``centroids_queue_cpu``, the official layout). Computed bytes for the full configuration are
printed beside a measurement at ``1/scale`` of the queue (peak RSS growth, ``VmHWM``, over
allocating the bank, ``--steps`` retrieve + enqueue steps, and building the checkpoint copy), and
the measurement's projection back to full size.

Usage: python benchmarks/bench_bank_host_memory.py [--images 25000 --objects 32 --dim 384 --scale 8]
(defaults: the released ViT-S/16 ImageNet run, K = 32, Q = 25,000 images, D = 384, batch 128 per GPU)
"""

import argparse
import gc

import torch

from cribo.method.memory_bank import ObjectMemoryBank
from cribo.train.official_format import bank_to_official


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=25000)
    parser.add_argument("--objects", type=int, default=32)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--valid-per-image", type=int, default=20)
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    gib = 2**30
    full_entries = args.images * args.objects
    bank_bytes = 2 * full_entries * args.dim * 4
    print(f"configuration: K={args.objects} x Q={args.images} images = {full_entries:,} paired entries, D={args.dim}")
    print(f"computed, full size: bank {bank_bytes / gib:.2f} GiB + normalised copy {bank_bytes / gib:.2f} GiB "
          f"+ checkpoint copy {bank_bytes / gib:.2f} GiB = {3 * bank_bytes / gib:.2f} GiB peak "
          f"(official: bank + a fresh normalised copy every step, the same {2 * bank_bytes / gib:.2f} GiB in steady state)")

    images = args.images // args.scale
    g = torch.Generator().manual_seed(0)
    m = args.batch * args.valid_per_image
    queries = [torch.randn(m, args.dim, generator=g) for _ in range(2)]
    counts = torch.full((args.batch,), args.valid_per_image)
    gc.collect()
    base = rss_kib("VmHWM")
    bank = ObjectMemoryBank(images, args.objects, args.dim, generator=g)
    allocated = rss_kib("VmHWM")
    for _ in range(args.steps):
        bank.retrieve(*queries)
        bank.enqueue(*queries, counts)
    stepped = rss_kib("VmHWM")
    state = bank_to_official(bank)
    saved = rss_kib("VmHWM")
    del state
    mib = lambda kib: kib / 1024  # noqa: E731
    bank_part, scratch, ckpt_part = allocated - base, stepped - allocated, saved - stepped
    print(f"measured at 1/{args.scale} ({images:,} images, {images * args.objects:,} entries), peak-RSS growth: "
          f"bank + normalised copy {mib(bank_part):.0f} MiB (computed "
          f"{2 * 2 * images * args.objects * args.dim * 4 / 2**20:.0f}), retrieval scratch {mib(scratch):.0f} MiB "
          f"({m:,} queries x 65,536-row chunks: independent of Q), checkpoint copy {mib(ckpt_part):.0f} MiB")
    # the checkpoint copy (one 2 x K*Q x D gather) and the retrieval scratch are never alive together;
    # below the scratch peak the copy does not show in VmHWM, so its full size is taken as computed
    projected = bank_part * args.scale * 1024 + max(scratch * 1024, bank_bytes)
    print(f"projected full size: {projected / gib:.2f} GiB peak host memory for the bank "
          f"(bank and normalised copy x {args.scale}, plus the larger of the scratch and the checkpoint copy)")


if __name__ == "__main__":
    main()
