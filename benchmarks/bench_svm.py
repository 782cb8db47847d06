"""VOC07 SVM protocol: feature-extraction throughput against the bare forward, and the SVM grid's cost.

1. Extraction: images/s of ``cribo.eval.global_features.extract_global`` (JPEG decoding, squash
   resize, normalisation, forward, 2 x 2 pooling, L2 norm) against the bare backbone forward on
   tensors already in memory, same batch size and resolution. Target: ratio >= 0.9.
2. SVM grid: seconds of single ``LinearSVC`` fits at each cost of the official grid on random
   unit vectors of the real size (8192-d; ``--train`` images: a 3-fold CV fit sees 2/3 of them),
   then the projected core-hours of the full VOC07 benchmark (20 classes x 19 costs x 3 folds + 20
   final fits on 5,011 images) and of the low-shot grid (8 k x 5 samples x 20 classes x 19 costs on
   20 k images, official selection; our CV variant costs ~3 x that), and wall hours on 2 and 32
   cores (fits are independent: linear speed-up up to the number of tasks).

Usage: python benchmarks/bench_svm.py [--arch resnet50 --images 64 --size 224 --batch 32 --train 600]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cribo.data.voc07 import MultiLabelSet
from cribo.eval import svm
from cribo.eval.global_features import extract_global
from cribo.models.backbones import ResNetFeatures, build_resnet


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train", type=int, default=600, help="images of the timed SVM fits (VOC07 trainval: 5,011)")
    parser.add_argument("--skip-svm", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = ResNetFeatures(build_resnet(args.arch), args.arch).eval()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.images):  # VOC-like 500 x 375 JPEGs
            path = Path(tmp) / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(path)
        images = MultiLabelSet([str(i) for i in range(args.images)], paths, np.zeros((args.images, 1), np.int8), ("x",))
        extract_global(backbone, MultiLabelSet(images.ids[: args.batch], paths[: args.batch], images.labels, ("x",)),
                       args.size, args.batch, progress=False)  # warm-up
        start = time.perf_counter()
        extract_global(backbone, images, args.size, args.batch, progress=False)
        pipeline = args.images / (time.perf_counter() - start)
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        backbone(x)
        start = time.perf_counter()
        for _ in range(args.images // args.batch):
            backbone(x)
        bare = (args.images // args.batch) * args.batch / (time.perf_counter() - start)
    print(f"extraction {pipeline:.2f} img/s, bare forward {bare:.2f} img/s, ratio {pipeline / bare:.3f} "
          f"({args.arch}, {args.size} px, batch {args.batch}, threads {torch.get_num_threads()})")
    if args.skip_svm:
        return
    dim = 4 * backbone.embed_dim
    train = svm.l2_normalise(rng.normal(size=(args.train, dim)).astype(np.float32))
    targets = np.where(rng.random(args.train) < 0.1, 1, -1)  # ~10 % positives, as a VOC class
    seconds = []
    for cost in svm.COST_GRID:
        start = time.perf_counter()
        svm.make_svm(cost).fit(train, targets)
        seconds.append(time.perf_counter() - start)
    per_fit = float(np.mean(seconds))
    # liblinear's cost grows about linearly with the examples: scale to the real sizes
    full_fit = per_fit * (5011 * 2 / 3) / args.train
    full_core_s = 20 * (19 * 3 * full_fit + full_fit * 1.5)
    lowshot_core_s = sum(5 * 20 * 19 * per_fit * (20 * k) / args.train for k in svm.LOWSHOT_K)
    print(f"LinearSVC on {args.train} x {dim}: mean {per_fit:.3f} s per fit over the 19 costs "
          f"(min {min(seconds):.3f}, max {max(seconds):.3f})")
    for name, core_s in (("full VOC07", full_core_s), ("low-shot (test selection)", lowshot_core_s),
                         ("low-shot (cv selection)", 3 * lowshot_core_s)):
        print(f"{name}: {core_s / 3600:.2f} core-hours -> {core_s / 3600 / 2:.2f} h on 2 cores, "
              f"{core_s / 3600 / 32 * 60:.1f} min on 32 cores")


if __name__ == "__main__":
    main()
