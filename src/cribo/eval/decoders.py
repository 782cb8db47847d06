"""Segmentation decoders on ViT patch tokens: a linear decoder and Segmenter's mask transformer.

Both map ``B x h x w x D`` tokens to ``B x C x h x w`` logits at the token grid; the caller
upsamples to pixels. They are written here because the only maintained implementation
(mmsegmentation's ``SegmenterMaskTransformerHead``) needs mmcv, which does not install against
current torch; the transformer layers themselves are timm's ``Block``.

Mask transformer (Strudel et al., 2021, as configured in the paper's fine-tuning runs): tokens
projected to the decoder width, C learnable class embeddings appended, ``num_layers`` transformer
layers, LayerNorm; patch and class outputs each pass a bias-free linear projection and are
L2-normalised; the masks are their scalar products (``B x N x C``), LayerNorm-ed over the classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn


class LinearDecoder(nn.Module):
    """A 1 x 1 convolution on the tokens (mmseg ``FCNHead(num_convs=0)``): ``B x h x w x D -> B x C x h x w``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.conv(tokens.permute(0, 3, 1, 2))


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer: ``B x h x w x D`` tokens -> ``B x C x h x w`` mask logits.

    Args:
        dim: token width D of the backbone.
        num_classes: C.
        num_layers: transformer layers (2 in the paper's configs).
        num_heads: attention heads (6 for ViT-S, 12 for ViT-B).
        width: decoder width (default D).
        drop_path: stochastic depth of the decoder layers.
    """

    def __init__(self, dim: int, num_classes: int, num_layers: int = 2, num_heads: int = 6,
                 width: int | None = None, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        width = width or dim
        if width % num_heads:
            raise ValueError(f"decoder width {width} is not divisible by num_heads {num_heads}")
        self.num_classes = num_classes
        self.proj_in = nn.Linear(dim, width)
        self.class_embed = nn.Parameter(torch.zeros(1, num_classes, width))
        rates = torch.linspace(0, drop_path, num_layers).tolist()
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, qkv_bias=True, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(width)
        self.patch_proj = nn.Linear(width, width, bias=False)
        self.class_proj = nn.Linear(width, width, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        nn.init.trunc_normal_(self.class_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = tokens.shape
        x = self.proj_in(tokens.reshape(b, h * w, -1))
        x = torch.cat([x, self.class_embed.expand(b, -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        patches = F.normalize(self.patch_proj(x[:, : h * w]), dim=-1)
        classes = F.normalize(self.class_proj(x[:, h * w:]), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # B x N x C
        return masks.transpose(1, 2).reshape(b, self.num_classes, h, w)


class SegmentationModel(nn.Module):
    """Backbone + decoder: ``B x 3 x H x W`` images -> ``B x C x H x W`` logits (bilinear upsampling).

    Inputs whose sides are not multiples of the patch size are zero-padded for the backbone and the
    logits cropped back, so any window of the sliding inference can be scored.
    """

    def __init__(self, backbone: nn.Module, decoder: nn.Module, freeze_backbone: bool):
        super().__init__()
        self.backbone, self.decoder, self.freeze_backbone = backbone, decoder, freeze_backbone
        if freeze_backbone:
            for p in backbone.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:  # a frozen backbone stays in eval mode (no dropout / drop path)
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        p = self.backbone.patch_size
        pad_h, pad_w = (-height) % p, (-width) % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            tokens = self.backbone(images)
        logits = self.decoder(tokens.float())
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]
