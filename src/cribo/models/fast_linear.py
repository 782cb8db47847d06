"""``x @ W^T (+ b)`` on the CPU through oneDNN's inner product, forward and backward.

Why this exists: torch runs float32 ``mm`` on the CPU through MKL's sgemm, and MKL is slow on
the shapes of the DINO/CrIBo last layers (``rows x 256`` inputs against a ``65536 x 256``
weight). ``benchmarks/bench_linear_kernels.py`` times both kernels alternately; on the 2-core
AMD EPYC (Zen 4) of our CI, medians of 11 calls, ms:

=============================================  =======  ======
product (rows x in -> out)                     MKL      oneDNN
=============================================  =======  ======
last layer forward, 218 x 256 -> 65536          60.1     37.7
last layer forward, 32 x 256 -> 65536           23.4     10.8
last layer input gradient, 218 rows             43.3     35.4
last layer weight gradient, 218 rows            61.6     64.3
last layer weight gradient, 32 rows             20.3     12.2
ViT-Ti fc1 forward, 1184 x 192 -> 768            2.41     2.00
ViT-Ti fc1 weight gradient                       2.17     2.98
=============================================  =======  ======

Only the last layers use :func:`linear`. Routing the backbone's and the head MLP's products through
it too (ViT-Ti/16 at 96 px) measured no gain on a whole step (step time ratios 0.994 and 1.000, the
two settings alternating in one process over 12 steps): their small products gain a few tenths of a
millisecond each, about what the Python-level autograd function costs per call. Without autograd
(a teacher's forward, feature extraction) there is no such function: :func:`linear_without_autograd`
calls the kernel directly and fuses a following GELU into it; the ViT backbones use it then
(:func:`cribo.models.backbones.onednn_without_autograd`).

torch itself routes float32 matrix products to oneDNN only in its reduced-precision modes
(bf32 / tf32), which would change the numbers; this module keeps full float32 (the results
differ from MKL's by the order of the float32 sums only, about 1e-6 relative). The kernel is
``torch.ops.mkldnn._linear_pointwise``, the op torch's own compiler emits for CPU linear layers.
It has no autograd formula, so :class:`_InnerProduct` gives it one: the input's gradient is an
inner product too, and the weight's gradient goes to oneDNN only for few rows, where it is
faster. Wherever oneDNN does not apply (not in the build, another device or dtype, autocast,
empty inputs, ``torch.backends.mkldnn.enabled = False``, or ``CRIBO_ONEDNN_LINEAR=0`` in the
environment), :func:`linear` is ``torch.nn.functional.linear``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# read once: set CRIBO_ONEDNN_LINEAR=0 to run every product through torch's default kernel
ENABLED = os.environ.get("CRIBO_ONEDNN_LINEAR", "1") != "0"


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its inner-product op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_AVAILABLE = onednn_available()
# below this many rows the weight gradient goes to oneDNN too (see the table above)
FEW_ROWS = 64
# oneDNN sees row counts in multiples of this (see _InnerProduct)
ROW_BUCKET = 32


def _inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``N x I, O x I (, O) -> N x O``: ``x @ weight^T + bias`` by oneDNN (operands may be transposed views)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _InnerProduct(torch.autograd.Function):
    """``N x I`` input, ``O x I`` weight, optional ``O`` bias -> ``N x O``; the input's gradient by oneDNN too.

    oneDNN only ever sees row counts in multiples of :data:`ROW_BUCKET`. It caches a primitive (and
    its memory) per shape, and the object rows change every step: unbucketed, the cache grew by
    ~1 MiB a step in a CrIBo run and scattered small blocks among the step's large free ones. The
    forward pass pads the input with zero rows and drops their outputs (the padded buffer stays
    behind the returned rows); the input's gradient takes the whole buckets through oneDNN and the
    remaining rows through torch's kernel.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        rows = x.shape[0]
        padded = -(-rows // ROW_BUCKET) * ROW_BUCKET
        if padded > rows:  # zero rows up to the bucket: the extra outputs are computed, then dropped
            x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
        return _inner_product(x, weight, bias)[:rows]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # N x O @ O x I: whole buckets by oneDNN, the rest by torch's kernel
            bulk = grad.shape[0] // ROW_BUCKET * ROW_BUCKET
            parts = [_inner_product(grad[:bulk], weight.t())] if bulk else []
            if bulk < grad.shape[0]:
                parts.append(grad[bulk:].mm(weight))
            grad_x = torch.cat(parts) if len(parts) > 1 else parts[0]
        if ctx.needs_input_grad[1]:
            # O x N @ N x I: oneDNN wins only for few rows N (its own benchmark, bench_linear_kernels.py);
            # its transposed orientation is faster still, but transposing a 65536 x 256 result costs 26 ms
            if x.shape[0] <= FEW_ROWS:
                grad_weight = _inner_product(grad.t(), x.t())
            else:
                grad_weight = grad.t().mm(x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=0)
        return grad_x, grad_weight, grad_bias


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` would run these operands through oneDNN."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (ENABLED and _AVAILABLE and torch.backends.mkldnn.enabled
            and x.dim() >= 2 and weight.dim() == 2 and x.numel() > 0
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu"))


def linear_without_autograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            gelu: bool = False) -> torch.Tensor:
    """``x @ W^T + b``, then the exact (erf) GELU if ``gelu`` (``... x I, O x I, O -> ... x O``), for calls
    that record no gradient (``torch.no_grad`` / ``inference_mode``: a teacher, feature extraction).

    Through oneDNN where :func:`uses_onednn`, the GELU fused into the product (one pass over the
    output fewer), with no autograd function around it; torch's kernels otherwise. oneDNN keeps a
    primitive per shape: meant for products whose row count is fixed (a backbone's tokens per batch).
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise RuntimeError("linear_without_autograd records no gradient; call it under torch.no_grad()")
    if not uses_onednn(x, weight, bias):
        out = F.linear(x, weight, bias)
        return F.gelu(out) if gelu else out
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "gelu" if gelu else "none", [],
                                             "none" if gelu else "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` (``... x I, O x I, O -> ... x O``), through oneDNN on the CPU in float32."""
    if not uses_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    return _InnerProduct.apply(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

