"""Backbones: timm Vision Transformers, torchvision ResNets, the raw-pixel baseline, and loading
them from checkpoints.

Every backbone used for evaluation is a :class:`PatchFeatureExtractor`: it maps normalised images
``B x 3 x H x W`` to a spatial feature map ``B x h x w x D`` (``h = H / patch_size``). For a
ViT these are the final block's tokens after the final LayerNorm, [CLS] dropped, as the dense
protocols prescribe; for a ResNet the last stage's output (res5, stride 32), channels last. The
``patch_size`` attribute is the map's stride in pixels, so every dense protocol treats both alike.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from cribo.models.archs import ARCHS  # noqa: F401  (re-exported: callers import it from here)
from cribo.models.fast_linear import linear_without_autograd


def build_backbone(model_cfg: dict, drop_path_rate: float | None = None) -> nn.Module:
    """The pretraining backbone of a run config: ``forward(B x 3 x H x W) -> B x D`` pooled features.

    A ViT returns its [CLS] token after the final norm; a ResNet (torchvision, random init, no
    zero-init of the last BN of each block, as ORL) its globally average-pooled res5 map. Either
    has ``embed_dim`` = D. ``drop_path_rate`` only applies to ViTs.
    """
    if is_resnet_arch(model_cfg["arch"]):
        return build_resnet(model_cfg["arch"])
    return build_vit(model_cfg, drop_path_rate=drop_path_rate)


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
    vit = VisionTransformer(
        img_size=model_cfg["img_size"], patch_size=model_cfg["patch_size"], num_classes=0,
        qkv_bias=True, dynamic_img_size=True,
        drop_path_rate=model_cfg.get("drop_path_rate", 0.0) if drop_path_rate is None else drop_path_rate,
        **kwargs,
    )
    return onednn_without_autograd(explicit_attention_for_few_tokens(vit))


# At most this many tokens per image, CPU attention runs as explicit products (see below).
FEW_TOKENS = 65  # 128 px crops at patch 16, with [CLS]


def explicit_attention_for_few_tokens(model: nn.Module) -> nn.Module:
    """Make each timm ``Attention`` in ``model`` pick its kernel per call: on the CPU with at most
    :data:`FEW_TOKENS` tokens, the explicit ``softmax(q k^T / sqrt(d)) v`` (timm's ``fused_attn = False``
    path), otherwise ``F.scaled_dot_product_attention``. Returns ``model``.

    Both compute the same attention (they differ by float rounding). On CPU, torch's fused kernel is
    the slower one at few tokens (``benchmarks/bench_attention.py``, forward and backward: 2.7 ms
    explicit against 4.1 ms fused for 32 images x 3 heads x 37 tokens, i.e. 96 px crops at patch
    16; 3.0 against 4.0 ms at 65 tokens), and the faster or the leaner at many (197 tokens and up),
    where the explicit path also keeps every ``N x N`` attention map for the backward pass. GPUs
    keep the fused kernel.
    """
    from timm.layers import Attention

    for module in model.modules():
        if isinstance(module, Attention):
            module.register_forward_pre_hook(_choose_attention_kernel)
    return model


def onednn_without_autograd(model: nn.Module) -> nn.Module:
    """Make the ``Linear`` layers and the timm ``Mlp`` blocks of ``model`` run, when called without
    autograd (the teacher's forward, feature extraction), through
    :func:`cribo.models.fast_linear.linear_without_autograd`: oneDNN's product on the CPU in
    float32, with each MLP's GELU fused into its first product. Returns ``model``.

    With autograd on, nothing changes (torch's kernels, as before). The modules keep their
    parameters and state-dict keys: only their class becomes a subclass whose ``forward`` picks the
    path per call. A ViT-Ti/16 forward of 32 images at 96 px, no gradient: 103 ms with torch's
    kernels, 100 with oneDNN's products, 96.5 with the GELUs fused (medians of 15 alternating calls;
    outputs within 4e-6 of each other).
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = _LinearWithoutAutogradKernel
        elif (type(module) is Mlp and type(module.act) is nn.GELU and module.act.approximate == "none"
              and isinstance(module.norm, nn.Identity) and isinstance(module.fc1, nn.Linear)):
            module.__class__ = _MlpWithoutAutogradKernel
    return model


class _LinearWithoutAutogradKernel(nn.Linear):
    """``nn.Linear``; without autograd, :func:`~cribo.models.fast_linear.linear_without_autograd` (see
    :func:`onednn_without_autograd`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return linear_without_autograd(x, self.weight, self.bias)


class _MlpWithoutAutogradKernel(Mlp):
    """timm's ``Mlp`` (exact GELU, no norm); without autograd, its GELU fused into ``fc1``'s product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        hidden = self.drop1(linear_without_autograd(x, self.fc1.weight, self.fc1.bias, gelu=True))
        return self.drop2(self.fc2(hidden))


def _choose_attention_kernel(attention: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a timm ``Attention`` (input ``B x N x D``): see :func:`explicit_attention_for_few_tokens`."""
    x = args[0]
    attention.fused_attn = not (x.device.type == "cpu" and x.shape[-2] <= FEW_TOKENS)


class PatchFeatureExtractor(nn.Module):
    """Interface: ``forward(B x 3 x H x W) -> B x h x w x D`` patch features.

    ``patch_size`` is the stride of the feature map in pixels, ``feature_map`` names the layer the
    map comes from (recorded in feature stores and rows).
    """

    patch_size: int
    embed_dim: int
    feature_map: str = "tokens"


# torchvision's ResNet layouts: block type and blocks per stage. ``resnet_tiny`` (one basic block per
# stage, 512-d res5) keeps tests fast on CPU; the others are the standard depths.
RESNET_ARCHS = {
    "resnet_tiny": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}
RESNET_STRIDE = 32  # res5: the stem (4) and three stride-2 stages


def is_resnet_arch(arch: str | None) -> bool:
    return arch in RESNET_ARCHS


def build_resnet(arch: str = "resnet50", zero_init_residual: bool = False) -> ResNet:
    """A randomly initialised torchvision ResNet in the torchvision key layout, classifier removed.

    ``fc`` is an identity, so ``model(x)`` gives the globally pooled res5 vector ``B x C`` (2048 for a
    ResNet-50) and the weights of any torchvision-layout checkpoint (``conv1.*``, ``bn1.*``,
    ``layer1.*`` ... ``layer4.*``) load into it. Used for evaluation here and meant to be shared with
    pretraining (BYOL/ORL use a ResNet-50 without zero-initialised residuals, hence the default).
    """
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown ResNet arch {arch!r}; known: {', '.join(RESNET_ARCHS)}")
    block, layers = RESNET_ARCHS[arch]
    model = ResNet(block, layers, zero_init_residual=zero_init_residual)
    model.fc = nn.Identity()
    model.embed_dim = resnet_width(model)  # what the pretraining heads read
    return model


def save_random_resnet(arch: str, seed: int, out) -> None:
    """Write a randomly initialised ResNet (torchvision layout, no ``fc``) to ``out``, atomically: the
    "Random" baseline of ORL's tables, imported like any released weights."""
    import os
    from pathlib import Path

    torch.manual_seed(seed)
    state = build_resnet(arch).state_dict()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, out)


def resnet_width(resnet: ResNet) -> int:
    """Channels of res5 (2048 for Bottleneck ResNets, 512 for BasicBlock ones)."""
    last = resnet.layer4[-1]
    return (last.bn3 if isinstance(last, Bottleneck) else last.bn2).num_features


class ResNetFeatures(PatchFeatureExtractor):
    """The res5 map of a torchvision ResNet, ``B x 3 x H x W -> B x H/32 x W/32 x C`` (channels last).

    The map is taken before the global pooling, after the last block's ReLU, as SlotCon/ORL-style
    dense evaluations and the VOC07 SVM's feat5 do.
    """

    feature_map = "res5"

    def __init__(self, resnet: ResNet, arch: str | None = None):
        super().__init__()
        self.resnet, self.arch = resnet, arch
        self.patch_size = RESNET_STRIDE
        self.embed_dim = resnet_width(resnet)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(images))))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        return x.permute(0, 2, 3, 1)


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


# ViT widths -> heads, for state dicts that carry no configuration (DeiT/DINO/timm conventions)
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def backbone_from_checkpoint(ckpt: dict, source: str = "checkpoint", timm_model: str | None = None) -> PatchFeatureExtractor:
    """The frozen evaluation backbone held by a loaded checkpoint, whatever wrote it.

    Accepted (``ckpt`` as returned by :func:`cribo.train.checkpoint.load_checkpoint`):

    - ours (``method`` and ``config`` keys): the teacher backbone, or the pixel baseline, or an
      imported baseline (``timm_model`` key: rebuilt by timm);
    - a ``cribo export`` safetensors file (the model config in its metadata);
    - an official CrIBo or DINO training checkpoint (``teacher`` with ``backbone.*`` keys);
    - a bare ViT state dict (a DINO/DeiT release, a timm ``.safetensors``/``.pth`` file, or one
      nested under ``model``/``state_dict``): with ``timm_model`` given, that timm architecture is
      built and timm's own key conversion applied; otherwise a ViT is built from the tensor shapes.

    The model is built for the grid of the stored position embeddings, and timm interpolates them
    for any other input size at run time. The result has ``default_img_size`` (the training crop
    size) and ``source_method`` attributes. A state dict that does not fit raises
    :class:`CheckpointError` listing missing and unexpected keys.
    """
    method, cfg = ckpt.get("method"), ckpt.get("config")
    if method is not None and cfg is not None:  # ours
        if method == "pixels":
            model = PixelPatches(ckpt["teacher"]["pixel_mean"], cfg["model"]["patch_size"])
            return _tag(model, cfg["model"]["img_size"], method)
        if ckpt.get("timm_model"):  # an imported baseline whose architecture timm builds
            model = _timm_backbone(ckpt["timm_model"], strip_prefix(ckpt["teacher"], "backbone."), source)
            return _tag(model, cfg["model"]["img_size"], method)
        net = build_backbone(cfg["model"], drop_path_rate=0.0)
        # the network the method evaluates (BYOL/ORL: the online one, stored with DDP's prefix)
        weights = {k.removeprefix("module."): v for k, v in ckpt[ckpt.get("evaluated_network", "teacher")].items()}
        weights = {k: v for k, v in strip_prefix(weights, "backbone.").items() if not k.startswith("fc.")}
        _load_strict(net, weights, source, f"the config's {cfg['model']['arch']}")
        features = ResNetFeatures(net, cfg["model"]["arch"]) if is_resnet_arch(cfg["model"]["arch"]) else ViTPatchFeatures(net)
        return _tag(features, cfg["model"].get("img_size"), method)
    meta = ckpt.get("__metadata__") or {}
    state = {k: v for k, v in ckpt.items() if k != "__metadata__"}
    if "cribo_model" in meta:  # cribo export
        import json

        model_cfg = json.loads(meta["cribo_model"])
        vit = build_vit(model_cfg, drop_path_rate=0.0)
        _load_strict(vit, state, source, "the model in its metadata")
        return _tag(ViTPatchFeatures(vit), model_cfg["img_size"], meta.get("method", "exported"))
    if isinstance(ckpt.get("teacher"), dict):  # official CrIBo / DINO training checkpoint
        state, source_method = ckpt["teacher"], "official"
    else:
        for key in ("model", "state_dict", "teacher_backbone"):
            if isinstance(ckpt.get(key), dict):
                state = ckpt[key]
                break
        source_method = "timm" if timm_model else "state_dict"
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    if any(k.startswith("backbone.") for k in state):
        state = strip_prefix(state, "backbone.")
    resnet_prefix = _resnet_prefix(state, source)
    if resnet_prefix is not None and timm_model is None:
        resnet, arch = resnet_from_state(strip_prefix(state, resnet_prefix), source)
        return _tag(ResNetFeatures(resnet, arch), 224, source_method)  # 224: the crop ResNets are trained at
    if timm_model is not None:
        model = _timm_backbone(timm_model, state, source)
        return _tag(model, model.vit.patch_embed.img_size[0], source_method)
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{source}: not a checkpoint we can read: no cribo 'method'/'config' keys, no "
                              f"'teacher', no torchvision-layout ResNet (conv1, layer1..4) and no ViT weights "
                              f"(pos_embed, patch_embed.proj.weight) in keys "
                              f"{sorted(state)[:8]}; for another timm architecture pass --timm-model NAME")
    vit, img_size = _vit_from_shapes(state, source)
    _load_strict(vit, state, source, "a ViT inferred from its shapes")
    return _tag(ViTPatchFeatures(vit), img_size, source_method)


# where the ResNet sits in released checkpoints, preferred first: bare, an extracted backbone, the
# momentum (key) encoder of MoCo/SlotCon-style releases, then the online (query) one
_RESNET_PREFIXES = ("", "backbone.", "teacher.", "encoder_k.", "encoder_q.", "encoder.")


def _resnet_prefix(state: dict, source: str) -> str | None:
    """The key prefix under which a torchvision-layout ResNet sits in ``state`` (None: no ResNet)."""
    marker = "layer1.0.conv1.weight"
    found = [k[: -len(marker)] for k in state if k.endswith(marker) and f"{k[: -len(marker)]}conv1.weight" in state]
    if not found:
        return None
    for prefix in _RESNET_PREFIXES:
        if prefix in found:
            return prefix
    if len(found) > 1:
        raise CheckpointError(f"{source}: several ResNets in one file (key prefixes {sorted(found)}); "
                              "extract the backbone you want into a file of its own")
    return found[0]


def resnet_from_state(state: dict, source: str = "state dict") -> tuple[ResNet, str]:
    """A torchvision ResNet holding ``state`` (torchvision key layout, ``fc.*`` ignored), and its arch name.

    The depth is read from the blocks per stage and the block type (``conv3`` present: Bottleneck).
    """
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    bottleneck = "layer1.0.conv3.weight" in state
    layers = [1 + max((int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")), default=-1)
              for i in range(1, 5)]
    arch = next((name for name, (block, blocks) in RESNET_ARCHS.items()
                 if blocks == layers and (block is Bottleneck) == bottleneck), None)
    if arch is None:
        raise CheckpointError(f"{source}: a ResNet with {layers} {'bottleneck' if bottleneck else 'basic'} blocks "
                              f"per stage is none of {', '.join(RESNET_ARCHS)}")
    resnet = build_resnet(arch)
    _load_strict(resnet, state, source, f"a torchvision {arch}")
    return resnet, arch


def _tag(model: PatchFeatureExtractor, img_size: int | None, method: str) -> PatchFeatureExtractor:
    model.default_img_size = img_size
    model.source_method = method
    return model


def _load_strict(vit: nn.Module, state: dict, source: str, what: str) -> None:
    """Load ``state`` into ``vit`` or raise :class:`CheckpointError` naming what does not fit.

    Shapes are compared before loading: torch's ``load_state_dict`` raises a bare RuntimeError
    on the first mismatched tensor, even with ``strict=False``.
    """
    expected = vit.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
                  if k in expected and expected[k].shape != v.shape]
    if missing or unexpected or mismatched:
        problems = [f"{label} {keys[:shown]}{' ...' if len(keys) > shown else ''}"
                    for label, keys, shown in (("wrong shapes (file vs model)", mismatched, 3),
                                               ("missing keys", missing, 6), ("unexpected keys", unexpected, 6))
                    if keys]
        raise CheckpointError(f"{source}: the backbone weights do not fit {what}: {'; '.join(problems)}; is it "
                              "another architecture or patch size? Pass the matching --timm-model, or the "
                              "checkpoint these weights belong to")
    vit.load_state_dict(state)


def _vit_from_shapes(state: dict, source: str) -> tuple[VisionTransformer, int]:
    """A timm ViT matching a DeiT/DINO-style state dict: width, depth, patch, grid and biases from shapes."""
    width = state["pos_embed"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    prefix = 1 if "cls_token" in state else 0
    grid = round((state["pos_embed"].shape[1] - prefix) ** 0.5)
    if width not in HEADS_BY_WIDTH:
        raise CheckpointError(f"{source}: ViT width {width} has no standard number of heads; pass --timm-model NAME")
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / width
    vit = VisionTransformer(img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth,
                            num_heads=HEADS_BY_WIDTH[width], mlp_ratio=mlp_ratio, num_classes=0,
                            qkv_bias="blocks.0.attn.qkv.bias" in state, class_token=bool(prefix),
                            dynamic_img_size=True)
    return vit, grid * patch


def _timm_backbone(name: str, state: dict, source: str) -> PatchFeatureExtractor:
    import timm
    from timm.models import vision_transformer

    kwargs = {}
    if "pos_embed" in state and "patch_embed.proj.weight" in state:
        # build at the grid the weights were trained at (no lossy resampling at load time)
        tokens = state["pos_embed"].shape[1] - (1 if "cls_token" in state else 0) - (
            state["reg_token"].shape[1] if "reg_token" in state else 0)
        kwargs["img_size"] = round(tokens ** 0.5) * state["patch_embed.proj.weight"].shape[-1]
    try:
        vit = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    except RuntimeError as err:
        raise CheckpointError(f"--timm-model {name!r}: {err}") from err
    if not isinstance(vit, VisionTransformer):
        raise CheckpointError(f"--timm-model {name!r} is not a VisionTransformer; only ViTs give patch tokens here")
    # timm's converter handles the DINO/MAE/DINOv2 key conventions and resamples position embeddings
    try:
        state = vision_transformer.checkpoint_filter_fn(state, vit)
    except (RuntimeError, ValueError) as err:  # e.g. weights of another width than the model
        raise CheckpointError(f"{source}: the weights do not fit --timm-model {name} ({err}); pass the timm "
                              "model these weights were trained as") from err
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in vit.state_dict()}
    _load_strict(vit, state, source, f"timm model {name}")
    model = ViTPatchFeatures(vit)
    return model
