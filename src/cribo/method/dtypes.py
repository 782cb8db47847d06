"""The method's numerics run in at least float32, whatever precision the networks' forward used."""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 tensors as float32; float32 and float64 ones unchanged (no copy).

    The official code casts with ``.float()``; keeping float64 lets the tests compare two
    implementations in double precision, where float32 rounding cannot hide a difference.
    """
    return x.float() if x.is_floating_point() and x.dtype.itemsize < 4 else x
