"""Backbones: timm Vision Transformers, the raw-pixel baseline, and loading them from checkpoints.

Every backbone used for evaluation is a :class:`PatchFeatureExtractor`: it maps normalised images
``B x 3 x H x W`` to last-layer patch tokens ``B x h x w x D`` (``h = H / patch_size``). For a
ViT these are the final block's tokens after the final LayerNorm, [CLS] dropped, as the dense
protocols prescribe.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

ARCHS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def build_vit(model_cfg: dict, drop_path_rate: float | None = None) -> VisionTransformer:
    """A timm ViT from the ``model`` section of a run config.

    ``dynamic_img_size`` lets the same weights run on global crops, local crops and evaluation
    resolutions (timm interpolates the position embeddings on the fly).
    """
    if model_cfg["arch"] not in ARCHS:
        raise ValueError(f"unknown arch {model_cfg['arch']!r}; known: {', '.join(ARCHS)}")
    kwargs = dict(ARCHS[model_cfg["arch"]])
    for key in ("embed_dim", "depth", "num_heads"):
        if model_cfg.get(key) is not None:
            kwargs[key] = model_cfg[key]
    return VisionTransformer(
        img_size=model_cfg["img_size"], patch_size=model_cfg["patch_size"], num_classes=0,
        qkv_bias=True, dynamic_img_size=True,
        drop_path_rate=model_cfg.get("drop_path_rate", 0.0) if drop_path_rate is None else drop_path_rate,
        **kwargs,
    )


class PatchFeatureExtractor(nn.Module):
    """Interface: ``forward(B x 3 x H x W) -> B x h x w x D`` patch features."""

    patch_size: int
    embed_dim: int


class ViTPatchFeatures(PatchFeatureExtractor):
    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.patch_size = vit.patch_embed.patch_size[0]
        self.embed_dim = vit.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        tokens = self.vit.forward_features(images)[:, self.vit.num_prefix_tokens:]
        return tokens.reshape(b, h // self.patch_size, w // self.patch_size, -1)


class PixelPatches(PatchFeatureExtractor):
    """The no-learning floor: each patch's raw RGB values, centred by the training-set mean colour.

    Centring matters because retrieval compares cosine similarities: uncentred pixel vectors all
    point into the same orthant and look alike.
    """

    def __init__(self, channel_mean: torch.Tensor, patch_size: int):
        super().__init__()
        self.register_buffer("channel_mean", channel_mean.reshape(1, 3, 1, 1).float())
        self.patch_size = patch_size
        self.embed_dim = 3 * patch_size * patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        p = self.patch_size
        patches = F.unfold(images - self.channel_mean, kernel_size=p, stride=p)  # B x 3pp x hw
        return patches.transpose(1, 2).reshape(b, h // p, w // p, self.embed_dim)


def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class CheckpointError(ValueError):
    pass


def backbone_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> PatchFeatureExtractor:
    """The frozen evaluation backbone stored in one of our checkpoints (the teacher's)."""
    method = ckpt.get("method")
    cfg = ckpt.get("config")
    if cfg is None or method is None:
        raise CheckpointError(f"{source}: not a cribo checkpoint (no 'method'/'config' keys; "
                              f"keys are {sorted(ckpt)[:10]})")
    if method == "pixels":
        return PixelPatches(ckpt["teacher"]["pixel_mean"], cfg["model"]["patch_size"])
    vit = build_vit(cfg["model"], drop_path_rate=0.0)
    state = strip_prefix(ckpt["teacher"], "backbone.")
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: teacher backbone does not match the config's model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return ViTPatchFeatures(vit)
