"""Cross-entropies ``H(t, s) = -sum_k t_k * log_softmax(s / tau)_k`` of many targets against shared logits.

Every CrIBo and DINO term is of this form, with ``K = 65536`` classes: the student's log-softmax
of a row is needed by one or two targets (the other view's teacher, a bank neighbour), and the
gradient with respect to the logits is known in closed form,

    dH / ds = (softmax(s / tau) * sum_k t_k - t) / tau,

so nothing of size ``rows x K`` has to be kept for the backward pass besides the logits and the
targets that exist anyway. Autograd's version keeps a log-softmax per use, a masked copy of every
target and of the broadcast log-probabilities, and recomputes the log-softmax for each target.
Here the log-softmax of each row is computed once, in blocks of ``chunk_rows`` rows, and the
backward pass writes the gradient in the same blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cribo.method.dtypes import at_least_fp32

CHUNK_ROWS = 64


def _targets_by_block(rows: torch.Tensor, num_rows: int, chunk_rows: int):
    """For each block ``[a, b)`` of logit rows: ``(a, b, indices of the targets whose row is in it)``."""
    order = torch.argsort(rows, stable=True)
    bounds = torch.searchsorted(rows[order], torch.arange(0, num_rows + chunk_rows, chunk_rows, device=rows.device))
    for i, start in enumerate(range(0, num_rows, chunk_rows)):
        yield start, min(start + chunk_rows, num_rows), order[bounds[i]:bounds[i + 1]]


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, temp: float,
                chunk_rows: int) -> torch.Tensor:
        losses = logits.new_zeros(targets.shape[0])
        for start, end, which in _targets_by_block(rows, logits.shape[0], chunk_rows):
            if which.numel():
                log_probs = F.log_softmax(logits[start:end] / temp, dim=-1)  # once per row, whatever its targets
                losses[which] = -(targets[which] * log_probs[rows[which] - start]).sum(dim=-1)
        ctx.save_for_backward(logits, targets, rows)
        ctx.temp, ctx.chunk_rows = temp, chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        logits, targets, rows = ctx.saved_tensors
        temp, chunk_rows = ctx.temp, ctx.chunk_rows
        grad = torch.zeros_like(logits)
        # per row r: (softmax(s_r / tau) * sum_j g_j * sum_k t_jk - sum_j g_j * t_j) / tau, over its targets j
        weight = logits.new_zeros(logits.shape[0]).index_add_(0, rows, grad_losses * targets.sum(dim=-1))
        for start, end, which in _targets_by_block(rows, logits.shape[0], chunk_rows):
            if which.numel():
                block = grad[start:end]
                block.index_add_(0, rows[which] - start, targets[which] * -grad_losses[which, None])
                block += F.softmax(logits[start:end] / temp, dim=-1) * weight[start:end, None]
                block /= temp
        return grad, None, None, None, None


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, temp: float,
                       chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """``H(targets_j, logits[rows_j])`` for each target ``j``, with a lean backward pass.

    Args:
        logits: ``N x K`` student logits (float32; gradients flow to them).
        targets: ``T x K`` target distributions (no gradient).
        rows: ``T`` indices into ``logits``: the row each target teaches.
        temp: student temperature ``tau``.
    Returns:
        ``T`` cross-entropies.
    """
    if targets.shape[0] != rows.shape[0] or targets.shape[1:] != logits.shape[1:]:
        raise ValueError(f"targets {tuple(targets.shape)}, rows {tuple(rows.shape)} and logits "
                         f"{tuple(logits.shape)} do not match")
    return _SoftCrossEntropy.apply(at_least_fp32(logits), at_least_fp32(targets.detach()), rows.to(logits.device), temp, chunk_rows)
