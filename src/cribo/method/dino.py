"""The DINO self-distillation loss: centring and sharpening of the teacher, cross-view cross-entropy.

``H(t, s) = -sum_k softmax((t - c) / tau_t)_k * log_softmax(s / tau_s)_k``, averaged over the batch
and over every (teacher view i, student view j) pair with ``i != j``. The centre ``c`` is an EMA
(momentum 0.9) of the teacher outputs' batch mean, averaged over processes. Computed in float32
whatever the input precision, as the official code does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def dino_cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean over the batch of ``-sum_k p_k log softmax(s / tau_s)_k``; inputs ``B x K``."""
    return torch.sum(-teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1), dim=-1).mean()


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, teacher_temp_schedule: Sequence[float], student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_temps = [float(t) for t in teacher_temp_schedule]
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], epoch: int) -> torch.Tensor:
        """``student_out``: one ``B x K`` tensor per crop; ``teacher_out``: one per global crop."""
        temp = self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)]
        teacher_probs = [F.softmax((t.float() - self.center) / temp, dim=-1).detach() for t in teacher_out]
        total, pairs = 0.0, 0
        for i, probs in enumerate(teacher_probs):
            for j, student in enumerate(student_out):
                if i == j:  # the same view on both sides teaches nothing
                    continue
                total = total + dino_cross_entropy(probs, student.float(), self.student_temp)
                pairs += 1
        self.update_center(teacher_out)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: list[torch.Tensor]) -> None:
        outputs = torch.cat([t.float() for t in teacher_out])
        batch_sum = outputs.sum(dim=0, keepdim=True)
        count = torch.tensor([outputs.shape[0]], dtype=torch.float32, device=outputs.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)
