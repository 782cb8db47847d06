"""Import a pretrained backbone (official release, timm weights, export) as a baseline "run".

A baseline enters the DAG like a trained run: ``results/<experiment>/<id>/pretrain/checkpoint.pth``
in our format plus ``summary.json`` (the completion marker), so extraction, every evaluation and
the tables treat it exactly as our own runs. The checkpoint records what the paper tables match
on: the method (e.g. ``dino``), architecture, patch size and pretraining data; a timm architecture
name is kept so the weights are rebuilt by timm (DINOv2, MAE, ... with their own layers).
"""

from __future__ import annotations

import time
from pathlib import Path

from cribo.models.backbones import ARCHS, ResNetFeatures, backbone_from_checkpoint
from cribo.train.checkpoint import file_sha256, load_checkpoint, save_checkpoint

_ARCH_BY_WIDTH = {spec["embed_dim"]: name for name, spec in ARCHS.items()}


def import_baseline(weights: str | Path, out_dir: str | Path, *, method: str, pretrain: str | None,
                    timm_model: str | None = None) -> dict:
    """Write ``out_dir/checkpoint.pth`` (our format) from ``weights``; returns the summary dict."""
    started = time.time()
    weights, out_dir = Path(weights), Path(out_dir)
    if not weights.is_file():
        raise FileNotFoundError(f"baseline weights not found: {weights} (download them and set baselines.<name>.weights)")
    backbone = backbone_from_checkpoint(load_checkpoint(weights), str(weights), timm_model=timm_model)
    if isinstance(backbone, ResNetFeatures):  # torchvision layout (ORL, SlotCon, MoCo, torchvision releases)
        net = backbone.resnet
        # patch_size = the stride of the res5 map: what the dense protocols and the paper tables key on
        model = {"arch": backbone.arch, "patch_size": backbone.patch_size, "img_size": backbone.default_img_size,
                 "embed_dim": backbone.embed_dim}
    else:
        net = getattr(backbone, "vit", None)
        if net is None:
            raise ValueError(f"{weights}: a baseline must be a ViT or a torchvision-layout ResNet backbone")
        width = net.embed_dim
        model = {"arch": _ARCH_BY_WIDTH.get(width, f"vit_{width}"), "patch_size": backbone.patch_size,
                 "img_size": backbone.default_img_size, "embed_dim": width, "depth": len(net.blocks),
                 "num_heads": net.blocks[0].attn.num_heads}
    # "seed": a baseline has none, but run ids of method "random" read it
    config = {"method": method, "seed": None, "model": model, "data": {"dataset": pretrain}, "baseline": {
        "weights": str(weights), "weights_sha256": file_sha256(weights), "timm_model": timm_model}}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"method": method, "config": config, "timm_model": timm_model,
                     "teacher": {f"backbone.{k}": v for k, v in net.state_dict().items()}},
                    out_dir / "checkpoint.pth")
    return {"method": method, "baseline": True, "checkpoint": str(out_dir / "checkpoint.pth"),
            "weights_sha256": config["baseline"]["weights_sha256"], "wall_time_s": round(time.time() - started, 1)}
