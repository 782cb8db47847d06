"""ORL stage 2d: RoI pairing with cached RoI embeddings (ours) against re-encoding per query (ORL's).

ORL's `generate_correspondence` encodes, for every query image, its own RoIs and those of its k
neighbours, so each RoI goes through the network about (1 + k) times. We encode every RoI once
(`cribo orl roi-embed`) and pair from the cache (`cribo orl pairs`). Both are run here on the same
simulated index (N images with B RoIs each, random crops of random images through a small
backbone) and must give the same pairs; the script prints forwards and seconds of each.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_orl_roi_pairing.py [--images 24 --rois 20 --k 10 --size 32]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from cribo.method.discovery import knn_excluding_self, top_pairs
from cribo.models.backbones import build_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--rois", type=int, default=20)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="RoI crop side (ORL: 224)")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = build_backbone({"arch": "vit_tiny", "patch_size": 8, "img_size": args.size, "depth": 2,
                          "embed_dim": 64, "num_heads": 2, "drop_path_rate": 0.0}).eval()
    crops = torch.randn(args.images, args.rois, 3, args.size, args.size)  # the RoI crops of each image
    knn = knn_excluding_self(F.normalize(torch.randn(args.images, 16), dim=1), args.k)

    def encode(i: int) -> torch.Tensor:
        return F.normalize(net(crops[i]), dim=1)

    with torch.no_grad():
        start, forwards = time.perf_counter(), 0
        cache = []
        for i in range(args.images):
            cache.append(encode(i))
            forwards += args.rois
        cached_pairs = [top_pairs(cache[i], cache[int(j)], 0.1)[0] for i in range(args.images) for j in knn[i]]
        cached_s, cached_forwards = time.perf_counter() - start, forwards

        start, forwards, naive_pairs = time.perf_counter(), 0, []
        for i in range(args.images):  # ORL: the query's and each neighbour's RoIs, encoded for this query
            query = encode(i)
            forwards += args.rois
            for j in knn[i]:
                naive_pairs.append(top_pairs(query, encode(int(j)), 0.1)[0])
                forwards += args.rois
        naive_s = time.perf_counter() - start
    same = all(torch.equal(a, b) for a, b in zip(cached_pairs, naive_pairs))
    print(f"{args.images} images x {args.rois} RoIs, k = {args.k}, {args.size} px crops; identical pairs: {same}")
    print(f"re-encoding per query: {forwards} RoI forwards, {naive_s:.2f} s")
    print(f"cached embeddings:     {cached_forwards} RoI forwards, {cached_s:.2f} s")
    print(f"{forwards / cached_forwards:.1f}x fewer forwards, {naive_s / cached_s:.1f}x less time")


if __name__ == "__main__":
    main()
