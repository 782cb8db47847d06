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

from cribo.method.dtypes import at_least_fp32

CHUNK_ROWS = 64


def _blocks(rows: torch.Tensor, num_rows: int, chunk_rows: int):
    """For each block ``[a, b)`` of logit rows: ``(a, b, lo, hi, local)``, where targets ``lo:hi`` teach rows
    of this block and ``local`` (``None`` when it is ``0 .. b - a - 1``, one target per row) are their rows in it."""
    edges = torch.searchsorted(rows, torch.arange(0, num_rows + chunk_rows, chunk_rows, device=rows.device)).tolist()
    for i, start in enumerate(range(0, num_rows, chunk_rows)):
        end, lo, hi = min(start + chunk_rows, num_rows), edges[i], edges[i + 1]
        if hi > lo:
            local = rows[lo:hi] - start
            one_each = hi - lo == end - start and bool((local == torch.arange(end - start, device=rows.device)).all())
            yield start, end, lo, hi, None if one_each else local


def softmax_in_place(x: torch.Tensor, log: bool = False) -> torch.Tensor:
    """(Log-)softmax over the last dimension written over ``x`` on CPU, where the row kernels were checked
    to give the same values in place (one pass over memory instead of an extra buffer); elsewhere into a
    new tensor, since in-place use of these kernels is not documented."""
    op = torch.log_softmax if log else torch.softmax
    if x.device.type == "cpu":
        return op(x, dim=-1, out=x)
    return op(x, dim=-1)


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, temp: float,
                chunk_rows: int) -> torch.Tensor:
        losses = logits.new_zeros(targets.shape[0])
        for start, end, lo, hi, local in _blocks(rows, logits.shape[0], chunk_rows):
            # once per row, whatever its targets
            log_probs = softmax_in_place(torch.div(logits[start:end], temp), log=True)
            if local is not None:
                log_probs = log_probs.index_select(0, local)
            losses[lo:hi] = -(targets[lo:hi] * log_probs).sum(dim=-1)
        ctx.save_for_backward(logits, targets, rows)
        ctx.temp, ctx.chunk_rows = temp, chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        logits, targets, rows = ctx.saved_tensors
        temp, chunk_rows = ctx.temp, ctx.chunk_rows
        grad = torch.empty_like(logits)
        # per row r: (softmax(s_r / tau) * sum_j g_j * sum_k t_jk - sum_j g_j * t_j) / tau, over its targets j;
        # 1 / tau is folded into both factors so that each block is written in three passes
        weight = logits.new_zeros(logits.shape[0]).index_add_(0, rows, grad_losses * targets.sum(dim=-1)) / temp
        scaled = grad_losses / temp
        taught = {start: (lo, hi, local) for start, _, lo, hi, local in _blocks(rows, logits.shape[0], chunk_rows)}
        for start in range(0, logits.shape[0], chunk_rows):
            end = min(start + chunk_rows, logits.shape[0])
            block = grad[start:end]
            if block.device.type == "cpu":
                softmax_in_place(torch.div(logits[start:end], temp, out=block))
            else:
                torch.softmax(logits[start:end] / temp, dim=-1, out=block)
            block.mul_(weight[start:end, None])
            if start not in taught:  # rows without targets: weight 0, zero gradient
                continue
            lo, hi, local = taught[start]
            if local is None:
                block.addcmul_(targets[lo:hi], scaled[lo:hi, None], value=-1)
            else:
                block.index_add_(0, local, targets[lo:hi] * scaled[lo:hi, None], alpha=-1)
        return grad, None, None, None, None


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, temp: float,
                       chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """``H(targets_j, logits[rows_j])`` for each target ``j``, with a lean backward pass.

    Args:
        logits: ``N x K`` student logits (at least float32; gradients flow to them).
        targets: ``T x K`` target distributions (no gradient), ordered by the row they teach.
        rows: ``T`` non-decreasing indices into ``logits``: the row each target teaches.
        temp: student temperature ``tau``.
    Returns:
        ``T`` cross-entropies.
    """
    if targets.shape[0] != rows.shape[0] or targets.shape[1:] != logits.shape[1:]:
        raise ValueError(f"targets {tuple(targets.shape)}, rows {tuple(rows.shape)} and logits "
                         f"{tuple(logits.shape)} do not match")
    rows = rows.to(logits.device)
    if rows.numel() > 1 and bool((rows[1:] < rows[:-1]).any()):
        raise ValueError("rows must be sorted (non-decreasing): order the targets by the row they teach")
    return _SoftCrossEntropy.apply(at_least_fp32(logits), at_least_fp32(targets.detach()), rows, temp, chunk_rows)
