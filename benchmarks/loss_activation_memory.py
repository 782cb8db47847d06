"""On-paper activation memory of CrIBo's loss terms on one GPU, before and after issue 14.

Counts every ``rows x D`` tensor (``D`` = 65536 head outputs) alive when the loss's forward pass
ends, which is the peak of the loss terms: the backward pass frees saved tensors as it creates
gradients of the same sizes. Weights, the backbone's activations and the bank are left out (they
are the same before and after). Shapes of the released ViT-S/16 COCO run (``vits16-coco`` args:
32 images per GPU, K = 64, fp16 autocast for the network forwards, losses in fp32):

- B images per GPU, 2 views: ``2B`` [CLS] rows per network;
- M valid objects per view (at most ``B * K``; the log's ``r_cnt`` is the per-image count);
- n1, n2 neighbours that pass the cycle check (at most M).

"before" is the step as first written (and, but for the neighbour rows, the official one: its
teacher head also runs on the view-2 twins of both neighbour sets, ``4M`` rows instead of ``2M``);
"first pass" is the step after issue 14's first changes (one head pass, the teacher's logits copied
into one target buffer); "now" is the current step, whose teacher head takes its rows in the order
the cross-entropies read them, so its fp32 logits become the targets in place.
Each line lists ``(what, rows, bytes per value)``.

Usage: python benchmarks/loss_activation_memory.py [--batch 32 --objects-per-image 64 --cycle 1.0]
"""

from __future__ import annotations

import argparse

FP32, FP16 = 4, 2


def before(b: int, m: int, n1: int, n2: int) -> list[tuple[str, int, int]]:
    return [
        ("teacher [CLS] logits, fp32 copies", 2 * b, FP32),
        ("teacher object logits, fp32 copies", 2 * m, FP32),
        ("teacher logits of every neighbour, fp32 copies", 2 * m, FP32),
        ("teacher [CLS] probabilities (saved by the products)", 2 * b, FP32),
        ("teacher object probabilities (saved)", 2 * m, FP32),
        ("neighbour probabilities, all of them", 2 * m, FP32),
        ("masked copies of the consistent neighbour probabilities (saved)", n1 + n2, FP32),
        ("student [CLS] logits, fp16 head output", 2 * b, FP16),
        ("student [CLS] logits, fp32 copies", 2 * b, FP32),
        ("student object logits, fp16 head output", 2 * m, FP16),
        ("student object logits, fp32 copies", 2 * m, FP32),
        ("[CLS] log-softmax, one per direction (saved)", 2 * b, FP32),
        ("object log-softmax for the cross-view term (saved)", 2 * m, FP32),
        ("object log-softmax recomputed for the cross-image term (saved)", 2 * m, FP32),
        ("masked copies of the broadcast log-softmax (saved)", n1 + n2, FP32),
    ]


def _student(b: int, m: int) -> list[tuple[str, int, int]]:
    """The student's lines, the same since issue 14's first changes."""
    return [
        ("student [CLS] logits, fp16 head output", 2 * b, FP16),
        ("student [CLS] logits, fp32 copy (saved)", 2 * b, FP32),
        ("student object logits, both views in one pass, fp16 head output", 2 * m, FP16),
        ("student object logits, fp32 copy (saved)", 2 * m, FP32),
        ("one block of log-softmax (64 rows), transient", 64, FP32),
    ]


def first_pass(b: int, m: int, n1: int, n2: int) -> list[tuple[str, int, int]]:
    return [
        ("teacher [CLS] logits, fp32 copy", 2 * b, FP32),
        ("teacher object + consistent-neighbour logits, one pass, fp32 copy", 2 * m + n1 + n2, FP32),
        ("[CLS] targets, both views in one buffer (saved)", 2 * b, FP32),
        ("object targets: other view + consistent neighbours, one buffer (saved)", 2 * m + n1 + n2, FP32),
    ] + _student(b, m)


def now(b: int, m: int, n1: int, n2: int) -> list[tuple[str, int, int]]:
    return [
        ("teacher [CLS] logits' fp32 copy, sharpened in place into the targets (saved)", 2 * b, FP32),
        ("teacher object + consistent-neighbour logits' fp32 copy, the same (saved)", 2 * m + n1 + n2, FP32),
    ] + _student(b, m)


def total_bytes(rows: list[tuple[str, int, int]], width: int) -> int:
    return sum(count * nbytes * width for _, count, nbytes in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="images per GPU (vits16-coco: 32)")
    parser.add_argument("--objects-per-image", type=int, default=64, help="valid objects per image (<= K = 64)")
    parser.add_argument("--cycle", type=float, default=1.0, help="fraction of neighbours passing the cycle check")
    parser.add_argument("--width", type=int, default=65536, help="head output size")
    args = parser.parse_args()
    b, m = args.batch, args.batch * args.objects_per_image
    n = round(args.cycle * m)
    print(f"B = {b} images/GPU, M = {m} objects/view, n1 = n2 = {n} consistent neighbours, D = {args.width}")
    for name, rows in (("before", before(b, m, n, n)), ("first pass", first_pass(b, m, n, n)),
                       ("now", now(b, m, n, n))):
        print(f"\n{name}: {total_bytes(rows, args.width) / 2**30:.2f} GiB")
        for what, count, nbytes in rows:
            print(f"  {count * nbytes * args.width / 2**20:9.0f} MiB  {count:6d} rows x {nbytes} B  {what}")


if __name__ == "__main__":
    main()
