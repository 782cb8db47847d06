"""CrIBo's three loss terms and their two centres.

``L = w_g * L_global + w_v * L_cross_view + w_i * L_cross_image`` (all weights 1 in the paper):

- ``L_global``: DINO's [CLS] loss across the two views (:class:`cribo.method.dino.DINOLoss`);
- ``L_cross_view``: each object's teacher distribution in one view supervises the student's same
  object in the other view: ``(mean_k H(t1_k, s2_k) + mean_k H(t2_k, s1_k)) / 2``;
- ``L_cross_image``: the bank neighbour of an object's view-1 vector supervises the student's
  view-2 vector of that object (and symmetrically), only for cycle-consistent objects and only
  from the second epoch on (the first fills the bank).

Teacher distributions are centred and sharpened: ``softmax((t - c) / tau)``; the object centre
``c_obj`` is an EMA (momentum 0.9) of the mean teacher object logit of both views, excluding the
neighbours. Everything is computed in float32.

Official quirks, reproduced by default and each behind a switch (see :class:`CrIBoLossConfig`):
``cross_image_norm="first_direction"`` divides *both* cross-image directions by the number of
consistent objects of the first direction, and skips the term when that number is 0, even if
the other direction has consistent objects; ``"per_direction"`` normalises each by its own count.
The student temperature of every term is 0.1 whatever the configuration passes to the
official command line (its ``--student_temp`` reaches only an unused attribute).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cribo.method.dino import DINOLoss, dino_cross_entropy


def teacher_probs(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution: ``softmax((logits - center) / temp)``, ``M x K``."""
    return F.softmax((logits.float() - center) / temp, dim=-1)


def cross_view_object_loss(t1: torch.Tensor, t2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                           student_temp: float) -> torch.Tensor:
    """``(mean_k H(t1_k, s2_k) + mean_k H(t2_k, s1_k)) / 2``: teacher probs ``t``, student logits ``s`` (``M x K``)."""
    if t1.shape[0] == 0:
        return s1.sum() * 0.0  # no valid object in the batch: zero, but still part of the graph
    return (dino_cross_entropy(t1, s2.float(), student_temp) + dino_cross_entropy(t2, s1.float(), student_temp)) / 2


def cross_image_object_loss(nn1: torch.Tensor, nn2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                            cycle1: torch.Tensor, cycle2: torch.Tensor, student_temp: float,
                            norm: str = "first_direction") -> torch.Tensor:
    """Cross-image object term.

    Args:
        nn1: ``M x K`` (or ``M x k x K`` for k neighbours) teacher probs of the bank neighbours of the
            view-1 objects (they teach ``s2``).
        nn2: the same for the neighbours of the view-2 objects (they teach ``s1``).
        s1, s2: ``M x K`` student object logits of view 1 and view 2.
        cycle1, cycle2: ``M`` (or ``M x k``) booleans, neighbours that passed the cycle check; the
            counts below are counts of such (object, neighbour) pairs.
        norm: ``"first_direction"`` (official) or ``"per_direction"`` (see the module docstring).
    """
    if nn1.dim() == 2:
        nn1, nn2, cycle1, cycle2 = nn1[:, None], nn2[:, None], cycle1[:, None], cycle2[:, None]

    def summed(targets, logits, mask):  # targets M x k x K, logits M x K, mask M x k
        log_probs = F.log_softmax(logits.float() / student_temp, dim=-1)[:, None].expand_as(targets)
        return torch.sum(-targets[mask] * log_probs[mask])

    n1, n2 = int(cycle1.sum()), int(cycle2.sum())
    zero = (s1.sum() + s2.sum()) * 0.0
    if norm == "first_direction":
        if n1 == 0:
            return zero
        return (summed(nn1, s2, cycle1) / n1 + summed(nn2, s1, cycle2) / n1) / 2
    if norm == "per_direction":
        term1 = summed(nn1, s2, cycle1) / n1 if n1 else zero
        term2 = summed(nn2, s1, cycle2) / n2 if n2 else zero
        return (term1 + term2) / 2
    raise ValueError(f"cross_image_norm must be 'first_direction' or 'per_direction', got {norm!r}")


@dataclass(frozen=True)
class LossWeights:
    global_: float = 1.0
    cross_view: float = 1.0
    cross_image: float = 1.0


class CrIBoLoss(nn.Module):
    """The three terms, the image centre (inside :class:`DINOLoss`) and the object centre."""

    def __init__(self, out_dim: int, object_out_dim: int, teacher_temp_schedule: Sequence[float],
                 student_temp: float = 0.1, center_momentum: float = 0.9, weights: LossWeights = LossWeights(),
                 cross_image_norm: str = "first_direction", cross_image_start_epoch: int = 1):
        super().__init__()
        self.global_loss = DINOLoss(out_dim, teacher_temp_schedule, student_temp, center_momentum)
        self.teacher_temps = [float(t) for t in teacher_temp_schedule]
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.weights = weights
        self.cross_image_norm = cross_image_norm
        self.cross_image_start_epoch = cross_image_start_epoch
        self.register_buffer("center_obj", torch.zeros(1, object_out_dim))

    def temperature(self, epoch: int) -> float:
        return self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)]

    def forward(self, student_cls: list[torch.Tensor], teacher_cls: list[torch.Tensor],
                student_obj: tuple[torch.Tensor, torch.Tensor], teacher_obj: tuple[torch.Tensor, torch.Tensor],
                neighbours: tuple[torch.Tensor, torch.Tensor] | None, cycle: tuple[torch.Tensor, torch.Tensor] | None,
                epoch: int) -> dict[str, torch.Tensor]:
        """All inputs are head outputs (logits). Returns the total and each term (detached copies for logs).

        Args:
            student_cls, teacher_cls: ``[B x K]`` per view.
            student_obj, teacher_obj: ``(M x K_obj, M x K_obj)`` for views 1 and 2.
            neighbours: teacher logits ``(M x K_obj, M x K_obj)`` of the bank neighbours of the view-1
                and view-2 objects, or None (no memory bank).
            cycle: the cycle-check masks ``(M, M)`` matching ``neighbours``.
        """
        temp = self.temperature(epoch)
        l_global = self.global_loss(student_cls, teacher_cls, epoch)
        t1, t2 = (teacher_probs(t, self.center_obj, temp).detach() for t in teacher_obj)
        l_view = cross_view_object_loss(t1, t2, *student_obj, self.student_temp)
        l_image = l_view * 0.0
        if neighbours is not None and epoch >= self.cross_image_start_epoch:
            nn1, nn2 = (teacher_probs(t, self.center_obj, temp).detach() for t in neighbours)
            l_image = cross_image_object_loss(nn1, nn2, *student_obj, *cycle, self.student_temp, self.cross_image_norm)
        self.update_object_center(teacher_obj)
        w = self.weights
        total = w.global_ * l_global + w.cross_view * l_view + w.cross_image * l_image
        return {"loss": total, "global": l_global.detach(), "cross_view": l_view.detach(),
                "cross_image": l_image.detach()}

    @torch.no_grad()
    def update_object_center(self, teacher_obj: tuple[torch.Tensor, torch.Tensor]) -> None:
        logits = torch.cat([t.float() for t in teacher_obj])
        total = logits.sum(dim=0, keepdim=True)
        count = torch.tensor([float(logits.shape[0])], device=logits.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        if count.item() > 0:
            self.center_obj.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
