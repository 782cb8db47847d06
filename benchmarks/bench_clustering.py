"""Joint-view clustering: our chunked single-linkage cost against the official 4-D formula.

Runs each implementation in a fresh subprocess (so peak RSS is its own), on the same tokens,
positions and initial centroids, and prints wall time (median of --repeats), peak RSS above the
process's baseline, and whether the assignments are identical.

Usage: python benchmarks/bench_clustering.py [--batch 32 --tokens 196 --clusters 64 --dim 384]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def official_position_cost(positions, assignment):
    """The official computation, materialising B x 2N x 2N x K (written from its description)."""
    d = torch.sqrt(((positions[:, None] - positions[:, :, None]) ** 2).sum(-1))
    pd = torch.einsum("bnm,bmk->bnmk", d, assignment)
    nonzero = (pd != 0).sum(dim=2, keepdim=True)
    pd[(pd == 0) & (nonzero != 0)] = 1e5
    p = pd.amin(dim=2)
    p = torch.where(p == 0, p.mean(dim=(1, 2), keepdim=True).expand_as(p), p)
    return p / p.amax(dim=(1, 2), keepdim=True)


def worker(args) -> None:
    import cribo.method.clustering as clustering

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    t = 2 * args.tokens
    tokens = torch.randn(args.batch, t, args.dim, generator=g)
    side = int(args.tokens ** 0.5)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(-1, 2).float()
    positions = torch.cat([grid * 16 + 8, grid * 12 + 40], 0)[None].repeat(args.batch, 1, 1)
    seeds = clustering.sample_seeds(args.batch, t, args.clusters, g)
    if args.impl == "official":
        clustering.position_cost = lambda pos, a, chunk=0: official_position_cost(pos, a)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = clustering.joint_view_clustering(tokens, positions, args.clusters, 1.0, seeds=seeds)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(out.argmax(-1), args.out)
    print(json.dumps({"seconds": statistics.median(times), "peak_mb": (peak - base) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=196, help="tokens per view (a square number)")
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impl", choices=["ours", "official"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.impl:
        return worker(args)
    results = {}
    for impl in ("official", "ours"):
        out = f"/tmp/bench_clustering_{impl}.pt"
        cmd = [sys.executable, __file__, "--impl", impl, "--out", out] + [
            f"--{k}={getattr(args, k)}" for k in ("batch", "tokens", "clusters", "dim", "repeats")]
        results[impl] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        results[impl]["labels"] = torch.load(out)
    same = torch.equal(results["official"]["labels"], results["ours"]["labels"])
    o, u = results["official"], results["ours"]
    print(f"B={args.batch} 2N={2 * args.tokens} K={args.clusters} D={args.dim}, 5 rounds, median of {args.repeats}")
    print(f"official 4-D: {o['seconds']:.2f} s, peak +{o['peak_mb']:.0f} MB")
    print(f"ours chunked: {u['seconds']:.2f} s, peak +{u['peak_mb']:.0f} MB")
    print(f"memory ratio {u['peak_mb'] / o['peak_mb']:.3f}, time ratio {u['seconds'] / o['seconds']:.2f}, "
          f"identical assignments: {same}")


if __name__ == "__main__":
    main()
