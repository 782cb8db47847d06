"""DINO as a method: its self-distillation loss (centring and sharpening of the teacher, cross-view
cross-entropy) and :class:`DINOMethod`, the recipe the training engine runs.

Follows DINO's ``DINOLoss`` (Caron et al., ICCV 2021) and CrIBo's global term ``d_loss``:

    H(t, s) = -sum_k softmax((t - c) / tau_t)_k * log_softmax(s / tau_s)_k

averaged over the batch, summed over every (teacher crop i, student crop j) pair with ``i != j``
(a view never teaches itself) and divided by the number of pairs. The teacher temperature
``tau_t`` comes from a per-epoch schedule (warm-up 0.04 -> 0.07); ``tau_s = 0.1``. The centre
``c`` is an EMA (momentum 0.9) of the teacher outputs' mean over the global batch (all processes),
updated after the loss is computed, so a step's loss uses the centre of the previous steps.
Everything is computed in float32 whatever the input precision, as the official code does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cribo.method.base import Method
from cribo.method.dtypes import at_least_fp32


def dino_cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Batch mean of ``-sum_k p_k * log_softmax(s / student_temp)_k``.

    Args:
        teacher_probs: ``B x K`` target distributions (rows sum to 1).
        student_logits: ``B x K`` raw student logits (divided by ``student_temp`` here).
    Returns:
        scalar tensor.
    """
    return torch.sum(-teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1), dim=-1).mean()


@torch.no_grad()
def ema_of_mean(center: torch.Tensor, batch_sum: torch.Tensor, count: int, momentum: float) -> torch.Tensor:
    """``momentum * center + (1 - momentum) * batch_sum / count``, with the sum and the count all-reduced over
    processes (so the mean is over the global batch); ``center`` itself when no process has a row."""
    batch_sum = batch_sum.clone()
    total = torch.tensor([float(count)], device=batch_sum.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_sum)
        dist.all_reduce(total)
    if total.item() == 0:
        return center
    return center.mul(momentum).add_(batch_sum / total, alpha=1 - momentum)


class DINOLoss(nn.Module):
    """DINO loss with a centred, sharpened teacher; the centre is the buffer ``center`` (``1 x K``).

    Args:
        out_dim: number of prototypes ``K``.
        teacher_temp_schedule: teacher temperature per epoch (e.g. from
            :func:`cribo.method.schedules.linear_warmup_then_constant`); epochs past its end use its
            last value.
        student_temp: student temperature (0.1 in DINO and CrIBo).
        center_momentum: EMA momentum of the centre (0.9).
    """

    def __init__(self, out_dim: int, teacher_temp_schedule: Sequence[float], student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.teacher_temps = [float(t) for t in teacher_temp_schedule]
        if not self.teacher_temps or min(self.teacher_temps) <= 0:
            raise ValueError("teacher_temp_schedule must be a non-empty sequence of positive temperatures")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        # A buffer, not a parameter: it goes into the state dict (resumable) but gets no gradient.
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp(self, epoch: int) -> float:
        """The teacher temperature used at ``epoch``."""
        return self.teacher_temps[min(max(epoch, 0), len(self.teacher_temps) - 1)]

    def forward(self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], epoch: int) -> torch.Tensor:
        """Scalar loss (float32).

        Args:
            student_out: one ``B x K`` logit tensor per crop, the global crops first (in the same order
                as ``teacher_out``), then the local crops.
            teacher_out: one ``B x K`` logit tensor per global crop (no gradient flows into these).
            epoch: index into the teacher temperature schedule.
        """
        temp = self.teacher_temp(epoch)
        teacher_probs = [F.softmax((at_least_fp32(t.detach()) - self.center) / temp, dim=-1) for t in teacher_out]
        total, pairs = None, 0
        for i, probs in enumerate(teacher_probs):
            for j, student in enumerate(student_out):
                if i == j:  # the same view on both sides: skipped, only cross-view terms count
                    continue
                term = dino_cross_entropy(probs, at_least_fp32(student), self.student_temp)
                total = term if total is None else total + term
                pairs += 1
        if total is None:
            raise ValueError(f"no (teacher i, student j != i) pair with {len(teacher_out)} teacher and "
                             f"{len(student_out)} student crops; DINO needs at least 2 crops")
        self.update_center(teacher_out)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: list[torch.Tensor]) -> None:
        """``center <- m * center + (1 - m) * mean of all teacher rows`` (mean over every process).

        ``teacher_out``: list of ``B x K`` tensors. Sums and row counts are all-reduced, so the mean
        is over the global batch even if processes hold different batch sizes.
        """
        outputs = torch.cat([at_least_fp32(t.detach()) for t in teacher_out])
        self.update_center_from_sum(outputs.sum(dim=0, keepdim=True), outputs.shape[0])

    @torch.no_grad()
    def update_center_from_sum(self, batch_sum: torch.Tensor, count: int) -> None:
        """:meth:`update_center` given this process's ``1 x K`` sum of teacher rows and their number."""
        self.center.copy_(ema_of_mean(self.center, batch_sum, count, self.center_momentum))


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops: crops of equal size go through the backbone together.

    ``forward(list of V tensors B x 3 x S_v x S_v) -> (V*B) x K`` head outputs, crop-major.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        sizes = torch.tensor([c.shape[-1] for c in crops])
        # Boundaries between runs of equal-sized crops (globals first, then locals).
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        start, cls_tokens = 0, []
        for end in ends:
            cls_tokens.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(cls_tokens))


class DINOMethod(Method):
    """DINO (Caron et al., 2021): multi-crop views, ViT + DINO head student, EMA teacher, :class:`DINOLoss`.

    Checkpoint additions, in the official DINO/CrIBo layout: ``student`` (``module.``-prefixed),
    ``teacher``, ``dino_loss`` (the centre).
    """

    name = "dino"
    object_out_dim: int | None = None  # CrIBo adds an object last layer

    def views(self):
        from cribo.method.views import DINOViews

        dino_cfg, model_cfg = self.cfg["dino"], self.cfg["model"]
        return DINOViews(global_size=model_cfg["img_size"], local_size=dino_cfg["local_crop_size"],
                         num_local_crops=dino_cfg["local_crops_number"],
                         global_scale=tuple(dino_cfg["global_crops_scale"]),
                         local_scale=tuple(dino_cfg["local_crops_scale"]), jitter=tuple(dino_cfg["color_jitter"]))

    def wrap(self, backbone: nn.Module, head: nn.Module) -> nn.Module:
        return MultiCropWrapper(backbone, head)

    def build_networks(self):
        from cribo.models.backbones import build_backbone
        from cribo.models.heads import DINOHead

        model_cfg, dino_cfg = self.cfg["model"], self.cfg["dino"]

        def make(drop_path: float) -> nn.Module:
            backbone = build_backbone(model_cfg, drop_path_rate=drop_path)
            head = DINOHead(backbone.embed_dim, dino_cfg["out_dim"], hidden_dim=dino_cfg["hidden_dim"],
                            bottleneck_dim=dino_cfg["bottleneck_dim"], norm_last_layer=dino_cfg["norm_last_layer"],
                            object_out_dim=self.object_out_dim)
            return self.wrap(backbone, head).to(self.device)

        self.student, self.teacher = make(model_cfg["drop_path_rate"]), make(0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        return self.student, self.teacher

    def ema_momentum(self) -> float:
        return self.cfg["dino"]["momentum_teacher"]

    def teacher_temperatures(self, epochs: int):
        from cribo.method.schedules import linear_warmup_then_constant

        dino_cfg = self.cfg["dino"]
        # short runs skip the warm-up, as the official code does for epochs <= 2
        warmup = min(dino_cfg["warmup_teacher_temp_epochs"], epochs) if epochs > 2 else 0
        return linear_warmup_then_constant(dino_cfg["warmup_teacher_temp"], dino_cfg["teacher_temp"], warmup, epochs)

    def setup_training(self, epochs, steps_per_epoch, seed):
        dino_cfg = self.cfg["dino"]
        self.loss_fn = DINOLoss(dino_cfg["out_dim"], self.teacher_temperatures(epochs),
                                student_temp=dino_cfg["student_temp"],
                                center_momentum=dino_cfg["center_momentum"]).to(self.device)

    def step(self, online, batch, epoch, amp=None):
        crops = [c.to(self.device, non_blocking=True) for c in batch]
        with torch.no_grad(), amp():  # only the two global views pass through the teacher
            teacher_out = self.teacher(crops[:2]).float().chunk(2)
        with amp():
            student_out = online(crops).float().chunk(len(crops))
        return {"loss": self.loss_fn(list(student_out), list(teacher_out), epoch)}

    def before_optimizer_step(self, epoch):
        from cribo.models.heads import cancel_last_layer_gradients

        cancel_last_layer_gradients(self.student, epoch, self.cfg["dino"]["freeze_last_layer"])

    def checkpoint_state(self):
        from cribo.train.official_format import loss_to_official, model_to_official

        return {"student": model_to_official(self.student.state_dict(), ddp_prefix=True),
                "teacher": model_to_official(self.teacher.state_dict(), ddp_prefix=False),
                "dino_loss": loss_to_official(self.loss_fn.state_dict())}

    def load_checkpoint_state(self, ckpt):
        from cribo.train.official_format import loss_from_official, model_from_official

        self.student.load_state_dict(model_from_official(ckpt["student"]))
        self.teacher.load_state_dict(model_from_official(ckpt["teacher"]))
        self.loss_fn.load_state_dict(loss_from_official(ckpt["dino_loss"], self.name))
