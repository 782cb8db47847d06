"""torch's float32 ``mm`` (MKL) against oneDNN's inner product (:mod:`cribo.models.fast_linear`), per product.

The shapes of a CrIBo step at issue 14's setting: the 65536-wide last layers (bottleneck 256) at the
[CLS] rows (32) and the object rows (~218 per step on the benchmark's synthetic views), in the three
products of a layer (forward ``x W^T``, input gradient ``G W``, weight gradient ``G^T x``), and the
ViT-Ti/16 and head-MLP products. The two kernels run alternately (each repeat calls every variant
once), so a change in the machine's speed hits both; medians of ``--repeats`` calls.

Usage: python benchmarks/bench_linear_kernels.py [--repeats 11 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cribo.models.fast_linear import _inner_product, onednn_available
from cribo.train.host_memory import keep_freed_host_memory

# (label, rows, in, out)
SHAPES = [
    ("last layer, [CLS] rows", 32, 256, 65536),
    ("last layer, object rows", 218, 256, 65536),
    ("ViT-Ti qkv", 1184, 192, 576),
    ("ViT-Ti fc1", 1184, 192, 768),
    ("ViT-Ti fc2", 1184, 768, 192),
    ("head MLP 2048 x 2048", 250, 2048, 2048),
]


def medians(variants: dict, repeats: int) -> dict[str, float]:
    for run in variants.values():
        run()
    seconds = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) * 1e3 for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not onednn_available():
        raise SystemExit("this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    torch.set_num_threads(args.threads)
    keep_freed_host_memory()  # as the engine: no page faults for the fresh outputs
    generator = torch.Generator().manual_seed(0)
    print(f"{args.threads} threads, medians of {args.repeats} calls, ms (GFLOP/s)")
    print(f"{'product':44s} {'MKL mm':>16s} {'oneDNN':>16s} {'ratio':>6s}")
    for label, rows, width_in, width_out in SHAPES:
        x = torch.randn(rows, width_in, generator=generator)
        w = torch.randn(width_out, width_in, generator=generator)
        g = torch.randn(rows, width_out, generator=generator)
        gflop = 2 * rows * width_in * width_out / 1e9
        products = {
            "forward x W^T": (lambda: x @ w.t(), lambda: _inner_product(x, w)),
            "input gradient G W": (lambda: g @ w, lambda: _inner_product(g, w.t())),
            "weight gradient G^T x": (lambda: g.t() @ x, lambda: _inner_product(g.t(), x.t())),
        }
        for product, (mkl, onednn) in products.items():
            ms = medians({"mkl": mkl, "onednn": onednn}, args.repeats)
            cells = [f"{ms[k]:7.2f} ({gflop / ms[k] * 1e3:4.0f})" for k in ("mkl", "onednn")]
            print(f"{label + ', ' + product:44s} {cells[0]:>16s} {cells[1]:>16s} {ms['mkl'] / ms['onednn']:6.2f}")


if __name__ == "__main__":
    main()
