"""End-to-end fine-tuning for segmentation: backbone unfrozen, linear or mask-transformer decoder.

The paper's fine-tuning runs (``evaluation.md`` §3) are mmseg's Segmenter configs: ViT backbone with
stochastic depth 0.1, a 2-layer mask transformer (6 heads for ViT-S, 12 for ViT-B) or a linear
decoder, 512 crops, Adam with a poly schedule, sliding-window inference. Layer-wise lr decay
(iBOT / BEiT style) is optional (``layer_decay < 1``). Training and scoring are shared with the
``mmseg`` linear probe (:mod:`cribo.eval.dense_training`).
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from cribo.eval.decoders import LinearDecoder, MaskTransformerDecoder, SegmentationModel

DECODERS = ("mask", "linear")


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks of a timm ViT backbone.

    Checkpoints are loaded for inference with drop path 0; fine-tuning switches it on in place.
    """
    vit = getattr(backbone, "vit", None)
    if vit is None:
        return
    depth = len(vit.blocks)
    for i, block in enumerate(vit.blocks):
        r = rate * i / max(depth - 1, 1)
        for attr in ("drop_path1", "drop_path2"):
            if hasattr(block, attr):
                setattr(block, attr, DropPath(r) if r > 0 else nn.Identity())


def build_finetune_model(backbone: nn.Module, num_classes: int, decoder: str = "mask", *, num_layers: int = 2,
                         num_heads: int | None = None, drop_path: float = 0.1, seed: int = 0) -> SegmentationModel:
    """Backbone (trainable, drop path ``drop_path``) + decoder ``mask`` (Segmenter) or ``linear``,
    the decoder initialised from ``seed`` (so a rerun gives the same numbers).

    ``num_heads`` defaults to the backbone's own head count (6 for ViT-S, 12 for ViT-B, as the configs).
    """
    torch.manual_seed(seed)
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    set_drop_path(backbone, drop_path)
    if decoder == "linear":
        head = LinearDecoder(backbone.embed_dim, num_classes)
    else:
        vit = getattr(backbone, "vit", None)
        heads = num_heads or (vit.blocks[0].attn.num_heads if vit is not None else 1)
        head = MaskTransformerDecoder(backbone.embed_dim, num_classes, num_layers=num_layers, num_heads=heads)
    return SegmentationModel(backbone, head, freeze_backbone=False)
