"""The interface between the training engine and a self-supervised method.

A method is one class (one module per method) that says

- how to make its **views**: :meth:`Method.dataset` (by default the method's augmentation applied
  to each pretraining image);
- how to make its **networks**: :meth:`Method.build_networks` returns the online network (the
  student, trained by the optimiser) and the EMA target (the teacher);
- its **step**: :meth:`Method.step` turns a batch into a dict of losses (key ``loss`` is optimised);
- what it **adds to the checkpoint**: :meth:`Method.checkpoint_state` / :meth:`Method.load_checkpoint_state`
  (the networks in the method's official key layout, loss centres, memory banks).

The engine (:mod:`cribo.train.engine`) owns everything shared: data order, seeding, DDP, precision,
optimiser, the lr / weight-decay / EMA schedules, logging, exact resume and signals. It never asks
which method it runs. :func:`build_method` looks a method up by the config's ``method`` name.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

# method name -> "module:Class"; imported on demand so that a method's dependencies (e.g. OpenCV
# for ORL's stage 2) are only needed by runs of that method
REGISTRY = {
    "dino": "cribo.method.dino:DINOMethod",
    "cribo": "cribo.method.cribo_method:CrIBoMethod",
    "byol": "cribo.method.byol:BYOLMethod",
    "orl": "cribo.method.orl:ORLMethod",
}


class Method:
    """Base class: the defaults suit a student/EMA-teacher method with one network pair.

    Attributes set by :meth:`build_networks`: ``student`` (online) and ``teacher`` (EMA target).
    """

    name = "method"
    # which network the evaluations read: DINO evaluates its teacher, BYOL/ORL their online backbone
    evaluated_network = "teacher"

    def __init__(self, cfg: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None

    # ---- data ----
    def views(self):
        """``PIL image -> sample``: the method's augmentation of one image."""
        raise NotImplementedError

    def dataset(self, paths: list[Path]) -> torch.utils.data.Dataset:
        """The training set over ``paths``, indexable by ``(index, seed)`` (see :class:`UnlabeledImages`)."""
        from cribo.data.images import UnlabeledImages

        return UnlabeledImages(paths, self.views())

    # ---- networks ----
    def build_networks(self) -> tuple[nn.Module, nn.Module]:
        """Create ``(student, teacher)`` on ``self.device``, the teacher a copy of the student's mirrored part.

        Called right after the engine seeds torch with the run's seed, so every rank builds the same weights.
        """
        raise NotImplementedError

    def ema_pairs(self) -> Iterator[tuple[nn.Parameter, nn.Parameter]]:
        """``(online, target)`` parameter pairs the EMA update walks; by default the whole student."""
        online, target = list(self.student.parameters()), list(self.teacher.parameters())
        if len(online) != len(target):
            raise RuntimeError(f"{self.name}: student has {len(online)} parameters, teacher {len(target)}; "
                               "override ema_pairs()")
        return zip(online, target)

    def ema_momentum(self) -> float:
        """Base EMA momentum of the teacher, cosine-scheduled to 1 by the engine."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Optimiser groups; the engine applies the weight-decay schedule to the first group only."""
        if self.cfg["optim"]["decay_all_parameters"]:
            return [{"params": [p for p in self.student.parameters() if p.requires_grad]}]
        decay, no_decay = [], []
        for name, param in self.student.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ---- training ----
    def setup_training(self, epochs: int, steps_per_epoch: int, seed: int) -> None:
        """Losses, banks and other training state, created after the networks (no global RNG draws)."""

    def step(self, online: nn.Module, batch, epoch: int, amp=contextlib.nullcontext) -> dict:
        """Losses of one batch: ``{"loss": scalar tensor, ...extras}``; NaN extras mean "not measured".

        ``online`` is the student, possibly wrapped in DistributedDataParallel (use it for the forward
        whose gradient is synchronised); ``amp()`` is the autocast context for network forwards.
        """
        raise NotImplementedError

    def before_optimizer_step(self, epoch: int) -> None:
        """Between ``backward()`` and ``optimizer.step()`` (e.g. DINO's frozen last layer)."""

    # ---- checkpoint ----
    def checkpoint_state(self) -> dict:
        """Everything method-specific the checkpoint holds (networks in the official layout, centres, banks)."""
        return {"student": {f"module.{k}": v for k, v in self.student.state_dict().items()},
                "teacher": dict(self.teacher.state_dict())}

    def load_checkpoint_state(self, ckpt: dict) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        self.student.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["student"].items()})
        self.teacher.load_state_dict(ckpt["teacher"])

    def replica_checksums(self) -> dict[str, float]:
        """Extra state that must be identical on every rank (the teacher is always checked)."""
        return {}


def build_method(cfg: dict, device: torch.device) -> Method:
    """The :class:`Method` named by ``cfg["method"]``."""
    name = cfg["method"]
    if name not in REGISTRY:
        raise ValueError(f"method {name!r} is not trainable by the engine; trainable: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, device)
