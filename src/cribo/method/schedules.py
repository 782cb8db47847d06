"""Training schedules, computed up front as arrays indexed by the global step (or by the epoch).

Conventions of DINO's ``utils.cosine_scheduler`` (which CrIBo's ``source/utils/utils.py`` copies):
the learning rate warms up linearly, *both ends included* (``np.linspace(start, base, n)``, so the
last warm-up step already equals ``base``), then follows a half cosine from ``base`` to ``final``
that stops one step short of ``final``; weight decay and the teacher's EMA momentum use the same
cosine without warm-up. The teacher temperature is a per-epoch array: linear (both ends included)
over the warm-up epochs, then constant, as in DINO's ``DINOLoss.teacher_temp_schedule``.
"""

from __future__ import annotations

import numpy as np


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_warmup(warmup_epochs: int, epochs: int) -> None:
    _check_int("warmup_epochs", warmup_epochs, 0)
    if warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) must not exceed epochs ({epochs})")


def cosine_schedule(base_value: float, final_value: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up to ``base_value``, then a cosine from ``base_value`` to ``final_value``.

    Args:
        base_value: value at the end of the warm-up and at the start of the cosine.
        final_value: value the cosine tends to (reached only in the limit, as in DINO).
        epochs, steps_per_epoch: the array has ``epochs * steps_per_epoch`` entries.
        warmup_epochs: length of the warm-up, ``W = warmup_epochs * steps_per_epoch`` steps, during
            which the value goes linearly from ``start_warmup_value`` to ``base_value`` (both included).
        start_warmup_value: first value of the warm-up.

    Returns:
        ``float64`` array of shape ``(epochs * steps_per_epoch,)``. At step ``i`` of the cosine part
        of length ``L`` the value is ``final + 0.5 * (base - final) * (1 + cos(pi * i / L))``.

    Raises:
        ValueError: ``epochs`` or ``steps_per_epoch`` < 1, ``warmup_epochs`` < 0 or > ``epochs``.
    """
    _check_int("epochs", epochs, 1)
    _check_int("steps_per_epoch", steps_per_epoch, 1)
    _check_warmup(warmup_epochs, epochs)
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps)  # endpoint included, as in DINO
    steps = np.arange(epochs * steps_per_epoch - warmup_steps)
    length = max(len(steps), 1)  # an all-warm-up schedule has an empty cosine part
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / length))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def linear_warmup_then_constant(start: float, end: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch values (the teacher temperature): linear from ``start`` to ``end`` over ``warmup_epochs``, then ``end``.

    Entry ``e < warmup_epochs`` is ``start + (end - start) * e / (warmup_epochs - 1)`` (both ends
    included, DINO's ``np.linspace``); every later entry is ``end``. Shape ``(epochs,)``.

    Raises:
        ValueError: ``epochs`` < 1, ``warmup_epochs`` < 0 or > ``epochs``.
    """
    _check_int("epochs", epochs, 1)
    _check_warmup(warmup_epochs, epochs)
    warmup = np.linspace(start, end, warmup_epochs)
    return np.concatenate([warmup, np.full(epochs - warmup_epochs, end, dtype=np.float64)]).astype(np.float64)
