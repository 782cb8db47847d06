"""CPU attention: torch's fused kernel against the explicit products, by number of tokens.

``F.scaled_dot_product_attention`` against ``softmax(q k^T / sqrt(d)) v`` written as three ops
(timm's two paths), forward and backward and forward alone, at ViT-Ti/S head counts and the token
counts of 64-224 px crops at patch 16 and of larger evaluation inputs. The two run alternately;
medians of ``--repeats``. :func:`cribo.models.backbones.explicit_attention_for_few_tokens` picks
the explicit path up to ``FEW_TOKENS`` tokens on the CPU from these figures.

Usage: python benchmarks/bench_attention.py [--repeats 9 --threads 2]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_linear_kernels import medians

# (images, heads, tokens)
SHAPES = [(32, 3, 17), (32, 3, 37), (32, 6, 37), (16, 3, 65), (8, 3, 197), (8, 6, 197), (4, 6, 401), (2, 6, 785)]


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"{args.threads} threads, medians of {args.repeats}, ms; head dim 64")
    print(f"{'images x heads x tokens':24s} {'fwd+bwd fused':>14s} {'explicit':>9s} {'fwd fused':>10s} {'explicit':>9s}")
    for images, heads, tokens in SHAPES:
        q, k, v = (torch.randn(images, heads, tokens, 64, generator=generator, requires_grad=True) for _ in range(3))
        upstream = torch.randn(images, heads, tokens, 64, generator=generator)

        def train(attend):
            return lambda: attend(q, k, v).backward(upstream)

        def infer(attend):
            def run():
                with torch.no_grad():
                    attend(q, k, v)
            return run

        ms = medians({"train fused": train(F.scaled_dot_product_attention), "train explicit": train(explicit),
                      "infer fused": infer(F.scaled_dot_product_attention), "infer explicit": infer(explicit)},
                     args.repeats)
        print(f"{f'{images} x {heads} x {tokens}':24s} {ms['train fused']:14.2f} {ms['train explicit']:9.2f} "
              f"{ms['infer fused']:10.2f} {ms['infer explicit']:9.2f}")


if __name__ == "__main__":
    main()
