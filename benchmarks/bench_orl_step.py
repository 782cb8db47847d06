"""Training-step time of ORL stage 3 against stage 1 (BYOL) at the same batch.

Stage 1 runs 2 online + 2 target forwards of the 224 px views per image; stage 3 adds an
intra-RoI and an inter-RoI pair of 96 px patches (4 more of each), through the same backbone,
projector and target, and two more predictors. The note estimates ~1.4x for ResNet-50 (96 px
patches cost (96/224)^2 = 18% of a view each). Synthetic batches, forward + backward + SGD step +
EMA, through the methods' own `step` (`cribo.method.byol` / `cribo.method.orl`).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_orl_step.py [--arch resnet18 --size 224 --roi 96 --batch 8 --steps 3]
"""

import argparse
import time

import torch

from cribo.config import validate_run_config
from cribo.method.base import build_method


def step_seconds(method_name: str, args) -> float:
    cfg = validate_run_config({"method": method_name, "model": {"arch": args.arch, "img_size": args.size},
                               "optim": {"optimizer": "sgd", "decay_all_parameters": True}})
    torch.manual_seed(0)
    method = build_method(cfg, torch.device("cpu"))
    student, _ = method.build_networks()
    method.setup_training(1, 1, 0)
    optimizer = torch.optim.SGD(method.param_groups(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    b = args.batch
    views = [torch.randn(b, 3, args.size, args.size) for _ in range(2)]
    patches = [torch.randn(b, 3, args.roi, args.roi) for _ in range(4)]
    batch = views if method_name == "byol" else [views, patches[:2], patches[2:]]
    times = []
    for i in range(args.steps + 1):  # the first step warms up allocators
        start = time.perf_counter()
        loss = method.step(student, batch, 0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_s, p_t in method.ema_pairs():
                p_t.mul_(0.99).add_(p_s.detach(), alpha=0.01)
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    stage1, stage3 = step_seconds("byol", args), step_seconds("orl", args)
    print(f"{args.arch}, batch {args.batch}, views {args.size} px, RoI patches {args.roi} px (median of {args.steps})")
    print(f"stage 1 (byol): {stage1:.2f} s/step; stage 3 (orl): {stage3:.2f} s/step; ratio {stage3 / stage1:.2f}x")


if __name__ == "__main__":
    main()
