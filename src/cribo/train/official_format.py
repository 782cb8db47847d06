"""Translation between our training state and the official CrIBo checkpoint layout.

Our checkpoints *are* official-layout checkpoints with extra keys, so a researcher can hand one to
the official code (or to a converter written for it) and we can read the released ones:

========================  ===============================================================
official key              content
========================  ===============================================================
``student``               ``module.backbone.*``, ``module.head.*`` (DDP-prefixed, always)
``teacher``               ``backbone.*``, ``head.*``
``optimizer``             AdamW state, two groups (decayed weights, then biases and norms)
``epoch``                 number of completed epochs
``args``                  the run configuration (a plain dict here; an argparse Namespace there)
``dino_loss``             ``center`` ([CLS] centre) and, for CrIBo, ``center_c`` (object centre)
``centroids_queue_cpu``   ``2 x K*Q x D`` bank, newest row first (paired views)
``cpv_queue_cpu``         ``Q`` objects per enqueued image, newest first
``fp16_scaler``           GradScaler state, when training in fp16
========================  ===============================================================

The head's weight-normalised layers use torch's parametrization names here and the deprecated
``weight_g``/``weight_v`` names there; ``last_layer_obj`` is ``last_layer_c`` there. The official
``cls_queue_cpu`` is written but never read by the official code (dead state), so it is omitted;
the official resume code skips keys that are absent.
"""

from __future__ import annotations

import torch

from cribo.method.memory_bank import ObjectMemoryBank

# (our head sub-key, official head sub-key)
_HEAD_RENAMES = [
    ("last_layer_obj.parametrizations.weight.original0", "last_layer_c.weight_g"),
    ("last_layer_obj.parametrizations.weight.original1", "last_layer_c.weight_v"),
    ("last_layer.parametrizations.weight.original0", "last_layer.weight_g"),
    ("last_layer.parametrizations.weight.original1", "last_layer.weight_v"),
]


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        if old in key:
            return key.replace(old, new)
    return key


def model_to_official(state: dict[str, torch.Tensor], ddp_prefix: bool) -> dict[str, torch.Tensor]:
    """Our ``backbone.*``/``head.*`` state dict -> official names (``module.``-prefixed for the student)."""
    prefix = "module." if ddp_prefix else ""
    return {prefix + _rename(k, _HEAD_RENAMES): v for k, v in state.items()}


def model_from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`model_to_official`; accepts keys with or without ``module.``."""
    back = [(new, old) for old, new in _HEAD_RENAMES]
    return {_rename(k.removeprefix("module."), back): v for k, v in state.items()}


def loss_to_official(loss_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOLoss (``center``) or CrIBoLoss (``global_loss.center``, ``center_obj``) -> ``center``/``center_c``."""
    out = {"center": loss_state.get("center", loss_state.get("global_loss.center"))}
    if "center_obj" in loss_state:
        out["center_c"] = loss_state["center_obj"]
    return out


def loss_from_official(official: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    if method == "dino":
        return {"center": official["center"]}
    return {"global_loss.center": official["center"], "center_obj": official["center_c"]}


def bank_to_official(bank: ObjectMemoryBank) -> dict[str, torch.Tensor]:
    """Ring buffer -> the official shifted queue (row ``i`` is the ``i``-th newest object)."""
    order = (bank.head - 1 - torch.arange(bank.capacity)) % bank.capacity
    return {"centroids_queue_cpu": bank.entries[:, order.to(bank.entries.device)].cpu(),
            "cpv_queue_cpu": bank.counts.clone()}


def bank_from_official(bank: ObjectMemoryBank, queue: torch.Tensor, counts: torch.Tensor) -> None:
    """Load an official newest-first queue into ``bank`` (its shape must match)."""
    if tuple(queue.shape) != tuple(bank.entries.shape) or counts.numel() != bank.num_images:
        raise ValueError(f"the checkpoint's memory bank has shape {tuple(queue.shape)} and {counts.numel()} images; "
                         f"this run's has {tuple(bank.entries.shape)} and {bank.num_images} "
                         "(cribo.queue_size, cribo.num_clusters or the model width differ)")
    # newest-first rows laid out so that the newest sits just before head = 0
    bank.load_state_dict({"entries": queue.flip(1).contiguous(), "counts": counts.long().clone(),
                          "head": torch.tensor(0)})
