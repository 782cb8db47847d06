"""``cribo export``: a slim evaluation checkpoint (teacher backbone only) as safetensors.

A training checkpoint carries the student, both heads, the optimizer state and the memory bank:
for ViT-S/16 on ImageNet that is several GB, of which evaluation needs the 22M backbone weights.
safetensors stores tensors without pickle (nothing to execute on load) and memory-maps them. The
model configuration travels in the file's string metadata (``cribo_model``, JSON), together with
the method, the source checkpoint's sha256 and the git SHA, so ``--checkpoint model.safetensors``
works everywhere a training checkpoint does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cribo.config import git_sha
from cribo.models.backbones import ARCHS, CheckpointError, ViTPatchFeatures, backbone_from_checkpoint
from cribo.train.checkpoint import file_sha256, load_checkpoint


def exportable_model_config(ckpt: dict, backbone: ViTPatchFeatures) -> dict:
    """The ``model`` section that rebuilds ``backbone`` with :func:`cribo.models.backbones.build_vit`."""
    if ckpt.get("config") is not None:
        return dict(ckpt["config"]["model"])
    vit = backbone.vit
    arch = next((name for name, spec in ARCHS.items() if spec["embed_dim"] == vit.embed_dim), "vit_small")
    return {"arch": arch, "embed_dim": vit.embed_dim, "depth": len(vit.blocks),
            "num_heads": vit.blocks[0].attn.num_heads, "patch_size": vit.patch_embed.patch_size[0],
            "img_size": backbone.default_img_size, "drop_path_rate": 0.0}


def export_backbone(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the evaluation backbone of ``checkpoint`` to ``out`` (``.safetensors``), atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the export is a safetensors file; name it *.safetensors")
    ckpt = load_checkpoint(checkpoint)
    backbone = backbone_from_checkpoint(ckpt, str(checkpoint))
    if not isinstance(backbone, ViTPatchFeatures):
        raise CheckpointError(f"{checkpoint}: a {backbone.source_method!r} checkpoint has no network to export")
    model_cfg = exportable_model_config(ckpt, backbone)
    state = {k: v.detach().contiguous() for k, v in backbone.vit.state_dict().items()}
    metadata = {"format": "cribo-backbone/1", "cribo_model": json.dumps(model_cfg),
                "method": str(backbone.source_method), "source_sha256": file_sha256(checkpoint),
                "git_sha": str(git_sha())}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata=metadata)
        # safetensors creates its file with mode 0600; an export is meant to be shared like any file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
