"""Exact dense NN retrieval (``retrieve_soft_labels``) against the machine's float32 matmul rate.

1. matmul: ``torch.mm`` of a ``rows x dim`` by a ``dim x cols`` float32 matrix, median of --repeats.
2. search: ``retrieve_soft_labels`` (exact search over the float16 memory in float32 slices, top-k, softmax, label gather)
   of --queries random queries against a random --memory x --dim memory with --classes soft labels,
   timed in total (index build included) and for the query loop alone.
Search FLOPs are counted as 2 * Q * M * D (the similarity matmul only); the ratio search/matmul
says how close the exact search runs to the machine's BLAS rate.

Usage: python benchmarks/bench_incontext_search.py [--memory 200000 --queries 20000 --dim 384 --k 30]
"""

import argparse
import statistics
import time

import faiss
import numpy as np
import torch

from cribo.eval.incontext import _propagate, build_index, retrieve_soft_labels


def matmul_rate(rows: int, dim: int, cols: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, dim, generator=g)
    b = torch.randn(dim, cols, generator=g)
    out = torch.empty(rows, cols)
    torch.mm(a, b, out=out)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * rows * dim * cols / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16384)
    parser.add_argument("--mm-rows", type=int, default=4096)
    parser.add_argument("--mm-cols", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} OpenMP threads")
    gflops_mm = matmul_rate(args.mm_rows, args.dim, args.mm_cols, args.repeats)
    print(f"matmul  torch.mm {args.mm_rows}x{args.dim} @ {args.dim}x{args.mm_cols} float32: "
          f"{gflops_mm:.1f} GFLOP/s (median of {args.repeats})")

    rng = np.random.default_rng(0)
    memory = rng.standard_normal((args.memory, args.dim), dtype=np.float32)
    memory /= np.linalg.norm(memory, axis=1, keepdims=True)
    memory = memory.astype(np.float16)  # as select_memory stores it
    labels = rng.random((args.memory, args.classes), dtype=np.float32)
    labels /= labels.sum(axis=1, keepdims=True)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)

    start = time.perf_counter()
    out = retrieve_soft_labels(queries, memory, labels, k=args.k, batch_size=args.batch_size)
    total = time.perf_counter() - start
    assert out.shape == (args.queries, args.classes) and np.allclose(out.sum(axis=1), 1, atol=1e-4)
    start = time.perf_counter()
    index = build_index(memory)
    build = time.perf_counter() - start
    start = time.perf_counter()
    _propagate(queries, index, labels, args.k, 0.02, args.batch_size)
    search = time.perf_counter() - start

    flops = 2 * args.queries * args.memory * args.dim
    gflops_search = flops / search / 1e9
    print(f"search  retrieve_soft_labels Q={args.queries:,} M={args.memory:,} D={args.dim} k={args.k} "
          f"C={args.classes}: {total:.2f} s total (index build {build:.2f} s, queries {search:.2f} s = "
          f"{args.queries / search:,.0f} queries/s)")
    print(f"search  {flops / 1e12:.2f} TFLOP (2*Q*M*D) in {search:.2f} s: {gflops_search:.1f} GFLOP/s")
    print(f"ratio   search / matmul = {gflops_search / gflops_mm:.2f}")


if __name__ == "__main__":
    main()
