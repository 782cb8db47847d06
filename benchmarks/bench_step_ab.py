"""A/B of one setting of the CrIBo step, alternating step by step in one process.

Two processes timed one after the other see the machine in two states (on the shared 2-core CI
machine the speed drifts by ~10 % within an hour); alternating the two settings step by step in
one process makes both see the same state, so the paired ratio measures the setting itself.
The step is ``bench_train_step.py``'s (same shapes, same synthetic views, same loop: step,
backward, AdamW, EMA) at ``--preset issue``.

Settings (``--setting``):

- ``onednn``: the last layers' products through oneDNN (:mod:`cribo.models.fast_linear`) or
  through torch's default kernel;
- ``explicit-attention``: ViT attention at few tokens as explicit products
  (:func:`cribo.models.backbones.explicit_attention_for_few_tokens`) or always torch's fused kernel;
- ``teacher-scales``: the teacher's last layers as products with ``v`` and column factors
  ``g / ||v||`` folded into the sharpening (:meth:`cribo.models.heads.DINOHead.forward_pair_with_scales`),
  or with the normalised weight written first (the factors are then ones; the sharpening is the
  same single pass in both);
- ``backbone-no-autograd``: the teacher backbone's products (no autograd) through oneDNN with the
  MLP GELUs fused (:func:`cribo.models.backbones.onednn_without_autograd`), or through torch's
  kernels (its modules back to their timm / torch classes).

Usage: python benchmarks/bench_step_ab.py --setting onednn|explicit-attention|teacher-scales|backbone-no-autograd
       [--steps 10 --warmup 2 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import bench_train_step as bench
from cribo.method.cribo import cribo_step
from cribo.models import backbones, fast_linear
from cribo.train import engine
from cribo.train.host_memory import keep_freed_host_memory


FEW_TOKENS = backbones.FEW_TOKENS  # the setting's "on" value


def with_normalised_weights(head):
    """``head.forward_pair_with_scales`` through the written normalised weights, with factors of one."""
    def forward_pair_with_scales(images, objects):
        cls_logits, obj_logits = head.forward_pair(images, objects)
        return ((cls_logits, cls_logits.new_ones(1, cls_logits.shape[1])),
                (obj_logits, obj_logits.new_ones(1, obj_logits.shape[1])))
    return forward_pair_with_scales


def without_autograd_kernels(net) -> dict:
    """The modules :func:`backbones.onednn_without_autograd` gave a class, with that class."""
    kinds = (backbones._LinearWithoutAutogradKernel, backbones._MlpWithoutAutogradKernel)
    return {module: type(module) for module in net.modules() if type(module) in kinds}


def apply(setting: str, on: bool, teacher, swapped: dict) -> None:
    """``swapped``: :func:`without_autograd_kernels` of the teacher's backbone, taken once."""
    if setting == "backbone-no-autograd":
        for module, kind in swapped.items():
            module.__class__ = kind if on else kind.__mro__[1]  # the timm / torch class it subclasses
    elif setting == "onednn":
        fast_linear.ENABLED = on
    elif setting == "explicit-attention":
        backbones.FEW_TOKENS = FEW_TOKENS if on else 0
    elif setting == "teacher-scales":
        if on:
            teacher.head.__dict__.pop("forward_pair_with_scales", None)  # the class's method again
        else:
            teacher.head.forward_pair_with_scales = with_normalised_weights(teacher.head)
    else:
        raise ValueError(f"unknown setting {setting!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["onednn", "explicit-attention", "teacher-scales", "backbone-no-autograd"], required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each setting first")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_host_memory()
    config = argparse.Namespace(**bench.PRESETS["issue"], out_dim=65536, epoch=1, plain_adamw=False)
    student, teacher, loss_fn, bank, optimizer, settings = bench.build(config)
    pairs = list(zip(student.parameters(), teacher.parameters()))
    swapped = without_autograd_kernels(teacher.backbone)
    generator = torch.Generator().manual_seed(0)

    def step(on: bool) -> float:
        apply(args.setting, on, teacher, swapped)
        start = time.perf_counter()
        views, positions = bench.synthetic_views(config.batch, config.img, generator)
        out = cribo_step(student, teacher, loss_fn, bank, views, positions, config.epoch, settings)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        engine.update_teacher(pairs, 0.996)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step(True), step(False)
    on_seconds, off_seconds = [], []
    for _ in range(args.steps):
        on_seconds.append(step(True))
        off_seconds.append(step(False))
    ratios = [off / on for on, off in zip(on_seconds, off_seconds)]
    print(f"{args.setting}: on {statistics.median(on_seconds) * 1e3:.0f} ms, off "
          f"{statistics.median(off_seconds) * 1e3:.0f} ms a step (medians of {args.steps}); "
          f"median paired ratio off/on {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
