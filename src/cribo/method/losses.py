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

:class:`CrIBoLoss` computes the terms with :func:`cribo.method.soft_cross_entropy.soft_cross_entropy`:
each student row's log-softmax is computed once for all the targets it has (the other view's
teacher and its bank neighbours), in blocks of rows, with a closed-form backward pass. The
functions :func:`cross_view_object_loss` and :func:`cross_image_object_loss` below are the plain
definitions of the two object terms; the tests check the class against them.

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
import torch.nn.functional as F
from torch import nn

from cribo.method.dtypes import at_least_fp32
from cribo.method.dino import DINOLoss, dino_cross_entropy, ema_of_mean
from cribo.method.soft_cross_entropy import soft_cross_entropy, softmax_in_place


def teacher_probs(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution: ``softmax((logits - center) / temp)``, ``M x K``."""
    return F.softmax((at_least_fp32(logits) - center) / temp, dim=-1)


def cross_view_object_loss(t1: torch.Tensor, t2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                           student_temp: float) -> torch.Tensor:
    """``(mean_k H(t1_k, s2_k) + mean_k H(t2_k, s1_k)) / 2``: teacher probs ``t``, student logits ``s`` (``M x K``)."""
    if t1.shape[0] == 0:
        return s1.sum() * 0.0  # no valid object in the batch: zero, but still part of the graph
    return (dino_cross_entropy(t1, at_least_fp32(s2), student_temp) + dino_cross_entropy(t2, at_least_fp32(s1), student_temp)) / 2


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
        log_probs = F.log_softmax(at_least_fp32(logits) / student_temp, dim=-1)[:, None].expand_as(targets)
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
class ObjectTargets:
    """Where each target of the object terms sits, for teacher logits computed in the order the loss reads them.

    The targets, in their *natural* order: the teacher's view-2 objects (teaching the student's view-1
    rows ``0 .. M-1``), its view-1 objects (rows ``M .. 2M-1``), the consistent neighbours of the view-1
    objects (``n1``, teaching view-2 rows) and of the view-2 objects (``n2``, teaching view-1 rows).
    :func:`soft_cross_entropy` reads targets sorted by the student row they teach: ``order`` sorts
    the natural order (stably), ``rows`` are the sorted targets' student rows and ``place`` maps back.
    Feeding the teacher head its inputs as ``natural_inputs[order]`` makes its output rows the sorted
    targets directly, so no ``rows x K`` buffer has to be reordered.
    """

    objects: int  # M, objects per view
    rows: torch.Tensor  # T, non-decreasing
    order: torch.Tensor  # T, a permutation of the natural order
    place: torch.Tensor  # T, inverse of order
    is_object: torch.Tensor  # T booleans, sorted order: an object (not a neighbour)
    neighbours: tuple[torch.Tensor, torch.Tensor] | None  # the cycle masks (M x k each), None without the bank

    @property
    def neighbours_of_view1(self) -> int:
        return 0 if self.neighbours is None else int(self.neighbours[0].sum())

    @classmethod
    def build(cls, m: int, cycle: tuple[torch.Tensor, torch.Tensor] | None, device=None) -> "ObjectTargets":
        """``cycle``: the two ``M`` (or ``M x k``) masks of the neighbours that get a loss, or None for none."""
        own = torch.arange(m, device=device)
        rows = [own, own + m]
        masks = None
        if cycle is not None:
            masks = tuple(c if c.dim() == 2 else c[:, None] for c in cycle)
            rows += [masks[0].nonzero()[:, 0].to(own.device) + m, masks[1].nonzero()[:, 0].to(own.device)]
        sorted_rows, order, place = sorted_by_row(torch.cat(rows))
        return cls(m, sorted_rows, order, place, order < 2 * m, masks)


def sorted_by_row(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``T`` student rows of targets in some order -> ``(rows sorted, order, place)``: the targets sorted by the row
    they teach (stably, as :func:`soft_cross_entropy` reads them) are ``order``, and ``place`` is its inverse."""
    order = torch.argsort(rows, stable=True)
    place = torch.empty_like(order)
    place[order] = torch.arange(order.numel(), device=order.device)
    return rows[order], order, place


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

    def forward(self, student_cls: list[torch.Tensor] | torch.Tensor, teacher_cls: list[torch.Tensor] | torch.Tensor,
                student_obj: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
                teacher_obj: tuple[torch.Tensor, torch.Tensor],
                neighbours: tuple[torch.Tensor, torch.Tensor] | None, cycle: tuple[torch.Tensor, torch.Tensor] | None,
                epoch: int, neighbours_selected: bool = False) -> dict[str, torch.Tensor]:
        """All inputs are head outputs (logits). Returns the total and each term (detached copies for logs).

        Args:
            student_cls, teacher_cls: ``[B x K]`` per view, or both views stacked (``2B x K``, view 1 first).
            student_obj: ``(M x K_obj, M x K_obj)`` for views 1 and 2, or stacked (``2M x K_obj``); the
                stacked form spares a copy and gives one gradient tensor.
            teacher_obj: ``(M x K_obj, M x K_obj)`` for views 1 and 2.
            neighbours: teacher logits ``(M x K_obj, M x K_obj)`` (or ``M x k x K_obj`` for k neighbours) of
                the bank neighbours of the view-1 and view-2 objects, or None (no memory bank).
            cycle: the cycle-check masks ``(M, M)`` (or ``M x k``) matching ``neighbours``.
            neighbours_selected: ``neighbours`` hold only the rows of the cycle-consistent pairs,
                ``(n1 x K_obj, n2 x K_obj)`` in the order of ``cycle[i].nonzero()`` (the caller then
                need not run the head on the neighbours that get no loss).
        """
        temp = self.temperature(epoch)
        l_global = self.global_term(student_cls, teacher_cls, epoch)
        student = _stacked(student_obj)  # 2M x K: rows 0..M-1 view 1, M..2M-1 view 2
        m = teacher_obj[0].shape[0]
        zero = student.sum() * 0.0  # keeps an empty term in the graph
        own = torch.arange(m, device=student.device)
        use_bank = neighbours is not None and epoch >= self.cross_image_start_epoch
        # each teacher row and the student row it teaches: view 2's teacher teaches view 1's
        # student and conversely; the neighbours of a view-1 object teach its view-2 vector and conversely
        teachers, rows = [teacher_obj[1], teacher_obj[0]], [own, own + m]
        n1 = 0
        if use_bank:
            # M or M x k masks as M x k (reshape(m, -1) is ambiguous when a batch has no object, m = 0)
            c1, c2 = (c if c.dim() == 2 else c[:, None] for c in cycle)
            nn1, nn2 = neighbours
            if not neighbours_selected:
                nn1 = nn1.reshape(*c1.shape, nn1.shape[-1])[c1]
                nn2 = nn2.reshape(*c2.shape, nn2.shape[-1])[c2]
            n1 = int(c1.sum())
            teachers += [nn1, nn2]
            rows += [c1.nonzero()[:, 0] + m, c2.nonzero()[:, 0]]
        h = self._cross_entropies(student, teachers, rows, self.center_obj, temp, self.student_temp)
        self.update_object_center(teacher_obj)
        return self._total(l_global, *self._object_terms(h, m, n1, use_bank, zero))

    def forward_sorted(self, student_cls: torch.Tensor, teacher_cls: torch.Tensor, student_obj: torch.Tensor,
                       teacher_obj: torch.Tensor, targets: ObjectTargets, epoch: int,
                       teacher_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """:meth:`forward` for teacher logits already in the order the cross-entropies read them, which it
        overwrites with the teacher distributions (one ``rows x K`` buffer, no copy).

        Args:
            student_cls: ``2B x K`` student [CLS] logits, view 1 first.
            teacher_cls: ``2B x K`` teacher [CLS] logits in the order of the student rows they teach,
                i.e. view 2 first (view 2's teacher teaches view 1's student); overwritten.
            student_obj: ``2M x K_obj`` student object logits, view 1 first.
            teacher_obj: ``T x K_obj`` teacher logits of the objects and the consistent neighbours, row ``i``
                being target ``targets.order[i]`` (see :class:`ObjectTargets`); overwritten.
            teacher_scales: ``(1 x K, 1 x K_obj)`` column factors when the teacher's logits are
                ``teacher_cls * scales[0]`` and ``teacher_obj * scales[1]``
                (:meth:`cribo.models.heads.DINOHead.forward_pair_with_scales`); None when they are the logits.
        """
        dino = self.global_loss
        b2 = student_cls.shape[0]
        cls_scale, obj_scale = (None, None) if teacher_scales is None else teacher_scales
        cls_sum = _scaled(teacher_cls.sum(dim=0, keepdim=True), cls_scale)
        probs = sharpen_in_place(teacher_cls, dino.center, dino.teacher_temp(epoch), cls_scale)
        l_global = soft_cross_entropy(student_cls, probs, torch.arange(b2, device=probs.device),
                                      dino.student_temp).mean()
        dino.update_center_from_sum(cls_sum, b2)

        m = targets.objects
        zero = student_obj.sum() * 0.0  # keeps an empty term in the graph
        # the object centre is the mean of the objects' teacher logits, without the neighbours
        obj_sum = _scaled((targets.is_object.to(teacher_obj.dtype) @ teacher_obj)[None], obj_scale)
        probs = sharpen_in_place(teacher_obj, self.center_obj, self.temperature(epoch), obj_scale)
        h = soft_cross_entropy(student_obj, probs, targets.rows, self.student_temp)[targets.place]
        self.update_object_center_from_sum(obj_sum, 2 * m)
        use_bank = targets.neighbours is not None and epoch >= self.cross_image_start_epoch
        return self._total(l_global, *self._object_terms(h, m, targets.neighbours_of_view1, use_bank, zero))

    def _object_terms(self, h: torch.Tensor, m: int, n1: int, use_bank: bool,
                      zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-view and cross-image terms from the cross-entropies ``h`` of the targets in the order
        ``[view 2 -> view 1 (M), view 1 -> view 2 (M), neighbours of view 1 (n1), of view 2 (n2)]``."""
        l_view = h[:2 * m].mean() if m else zero  # = (mean_k H(t1, s2) + mean_k H(t2, s1)) / 2
        l_image = zero
        if use_bank:
            n2 = h.shape[0] - 2 * m - n1
            image1, image2 = h[2 * m:2 * m + n1].sum(), h[2 * m + n1:].sum()
            if self.cross_image_norm == "first_direction":
                l_image = (image1 / n1 + image2 / n1) / 2 if n1 else zero
            elif self.cross_image_norm == "per_direction":
                l_image = ((image1 / n1 if n1 else zero) + (image2 / n2 if n2 else zero)) / 2
            else:
                raise ValueError(f"cross_image_norm must be 'first_direction' or 'per_direction', "
                                 f"got {self.cross_image_norm!r}")
        return l_view, l_image

    def _total(self, l_global: torch.Tensor, l_view: torch.Tensor, l_image: torch.Tensor) -> dict[str, torch.Tensor]:
        w = self.weights
        total = w.global_ * l_global + w.cross_view * l_view + w.cross_image * l_image
        return {"loss": total, "global": l_global.detach(), "cross_view": l_view.detach(),
                "cross_image": l_image.detach()}

    def global_term(self, student_cls: list[torch.Tensor] | torch.Tensor, teacher_cls: list[torch.Tensor] | torch.Tensor,
                    epoch: int) -> torch.Tensor:
        """DINO's [CLS] loss and centre update (:class:`DINOLoss`), through the lean cross-entropy for two views."""
        if not torch.is_tensor(student_cls) and (len(student_cls) != 2 or len(teacher_cls) != 2):
            return self.global_loss(list(student_cls), list(teacher_cls), epoch)
        dino = self.global_loss
        student = _stacked(student_cls)
        teachers = teacher_cls.chunk(2) if torch.is_tensor(teacher_cls) else teacher_cls
        b = teachers[0].shape[0]
        own = torch.arange(b, device=student.device)
        # view 1's teacher teaches view 2's student and conversely: (H(t1, s2).mean + H(t2, s1).mean) / 2
        h = self._cross_entropies(student, [teachers[1], teachers[0]], [own, own + b], dino.center,
                                  dino.teacher_temp(epoch), dino.student_temp)
        dino.update_center(list(teachers))
        return h.mean()

    @staticmethod
    def _cross_entropies(student: torch.Tensor, teachers: list[torch.Tensor], rows: list[torch.Tensor],
                         center: torch.Tensor, temp: float, student_temp: float) -> torch.Tensor:
        """``H`` of each teacher row (logits, in the order of ``teachers``) against the student row it teaches."""
        sorted_rows, _, place = sorted_by_row(torch.cat(rows))
        probs = _centred_sharpened(teachers, list(place.split([r.numel() for r in rows])), center, temp)
        return soft_cross_entropy(student, probs, sorted_rows, student_temp)[place]

    @torch.no_grad()
    def update_object_center(self, teacher_obj: tuple[torch.Tensor, torch.Tensor]) -> None:
        total = sum(at_least_fp32(t).sum(dim=0, keepdim=True) for t in teacher_obj)
        self.update_object_center_from_sum(total, sum(t.shape[0] for t in teacher_obj))

    @torch.no_grad()
    def update_object_center_from_sum(self, batch_sum: torch.Tensor, count: int) -> None:
        """The object centre's EMA given this process's ``1 x K`` sum of object teacher logits and their number."""
        self.center_obj.copy_(ema_of_mean(self.center_obj, batch_sum, count, self.center_momentum))


@torch.no_grad()
def _centred_sharpened(logits: list[torch.Tensor], places: list[torch.Tensor], center: torch.Tensor,
                       temp: float) -> torch.Tensor:
    """:func:`teacher_probs` of the ``logits`` rows, written at rows ``places`` of one buffer and computed in place."""
    first = at_least_fp32(logits[0])
    probs = first.new_empty(sum(t.shape[0] for t in logits), first.shape[1])
    for part, place in zip(logits, places):
        probs.index_copy_(0, place, at_least_fp32(part.detach()))
    return sharpen_in_place(probs, center, temp)


@torch.no_grad()
def sharpen_in_place(logits: torch.Tensor, center: torch.Tensor, temp: float,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`teacher_probs` written over ``logits`` (``N x K``, float32 or wider): ``softmax((t - c) / temp)``.

    With ``scale`` (``1 x K``) the logits are ``logits * scale``, and the pass computes
    ``logits * (scale / temp) - c / temp`` (one pass instead of two)."""
    if scale is None:
        probs = logits.sub_(center).div_(temp)
    else:
        probs = torch.addcmul(center / -temp, logits, scale / temp, out=logits)
    if probs.device.type == "cpu":  # row by row: one pass over memory, not four (see softmax_in_place)
        return softmax_in_place(probs)
    probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()  # elementwise in place: no second buffer
    return probs.div_(probs.sum(dim=-1, keepdim=True))


def _scaled(row_sum: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A ``1 x K`` sum of logit rows, times the logits' column factors when they come apart (see ``forward_sorted``)."""
    return row_sum if scale is None else row_sum * scale


def _stacked(views: tuple[torch.Tensor, torch.Tensor] | list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Both views' rows in one tensor, view 1 first (a copy only when given separately)."""
    return views if torch.is_tensor(views) else torch.cat(list(views))
