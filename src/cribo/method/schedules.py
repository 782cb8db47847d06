"""Training schedules, computed up front as arrays indexed by the global step (or epoch).

As in DINO and CrIBo: the learning rate warms up linearly then follows a cosine to its final value;
weight decay and the teacher's EMA momentum follow a cosine without warm-up; the teacher
temperature warms up linearly per epoch and then stays constant.
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(base_value: float, final_value: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up to ``base_value``, then cosine from ``base_value`` to ``final_value``.

    Returns an array of length ``epochs * steps_per_epoch``; at step ``i`` of the cosine part of
    length ``L`` the value is ``final + (base - final) * (1 + cos(pi * i / L)) / 2``.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"epochs ({epochs}) and steps_per_epoch ({steps_per_epoch}) must be >= 1")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be between 0 and epochs ({epochs}), got {warmup_epochs}")
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps, endpoint=False)
    steps = np.arange(epochs * steps_per_epoch - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def linear_warmup_then_constant(start: float, end: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch values: linear from ``start`` to ``end`` over ``warmup_epochs``, then ``end``."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be between 0 and epochs ({epochs}), got {warmup_epochs}")
    return np.concatenate([np.linspace(start, end, warmup_epochs), np.full(epochs - warmup_epochs, end)])
