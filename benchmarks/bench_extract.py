"""Feature extraction throughput against the bare model's forward pass at the same batch size.

Usage: python benchmarks/bench_extract.py [--image-size 112] [--batch-size 64] [--images 512]
Prints images/s of (a) the backbone alone on in-memory tensors and (b) `extract_split` reading,
decoding and resizing JPEGs from a generated toy-scene folder, and their ratio.
"""

import argparse
import statistics
import tempfile
import time

import torch

from cribo.config import validate_run_config
from cribo.data.registry import get_spec
from cribo.data.toyscenes import generate
from cribo.eval.features import extract_split
from cribo.models.backbones import ViTPatchFeatures, build_vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = validate_run_config({"model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 96, "depth": 4}})
    backbone = ViTPatchFeatures(build_vit(cfg["model"], drop_path_rate=0.0)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = f"{tmp}/toy"
        generate(root, num_train=args.images, num_val=8, image_size=args.image_size, progress=False)
        spec = get_spec("toyscenes", root)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        bare, full = [], []
        for _ in range(args.repeats):
            with torch.no_grad():
                start = time.perf_counter()
                for _ in range(args.images // args.batch_size):
                    backbone(x)
                bare.append((args.images // args.batch_size) * args.batch_size / (time.perf_counter() - start))
            start = time.perf_counter()
            extract_split(backbone, spec, root, "train", args.image_size, batch_size=args.batch_size, progress=False)
            full.append(args.images / (time.perf_counter() - start))
    b, f = statistics.median(bare), statistics.median(full)
    print(f"bare forward: {b:.1f} img/s  extract_split: {f:.1f} img/s  ratio {f / b:.2f} "
          f"(median of {args.repeats}; batch {args.batch_size}, {args.image_size} px, ViT-Ti/8 depth 4)")


if __name__ == "__main__":
    main()
