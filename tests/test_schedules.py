"""Schedules: values worked out by hand from the DINO conventions (warm-up endpoint included)."""

import math

import numpy as np
import pytest

from cribo.method.schedules import cosine_schedule, linear_warmup_then_constant


def test_cosine_schedule_with_warmup_by_hand():
    # 3 epochs x 2 steps, 1 warm-up epoch: warm-up = linspace(0.5, 1.0, 2) = [0.5, 1.0] (DINO keeps
    # both ends), then a cosine of length L = 4 from 1 to 0: (1 + cos(pi i / 4)) / 2 for i = 0..3.
    s = cosine_schedule(1.0, 0.0, epochs=3, steps_per_epoch=2, warmup_epochs=1, start_warmup_value=0.5)
    c = math.cos(math.pi / 4)  # sqrt(2) / 2
    expected = [0.5, 1.0, 1.0, (1 + c) / 2, 0.5, (1 - c) / 2]  # 0.8535..., 0.1464...
    assert s.shape == (6,) and s.dtype == np.float64
    assert s.tolist() == pytest.approx(expected, abs=1e-12)


def test_cosine_schedule_endpoints_length_and_monotonicity():
    base, final, epochs, spe, warm = 2e-3, 1e-5, 7, 5, 2
    s = cosine_schedule(base, final, epochs, spe, warmup_epochs=warm)
    w = warm * spe
    assert len(s) == epochs * spe
    assert s[0] == 0.0 and s[w - 1] == pytest.approx(base) and s[w] == pytest.approx(base)
    assert np.all(np.diff(s[:w]) > 0)  # warm-up increases
    assert np.all(np.diff(s[w:]) < 0)  # cosine decreases
    # the last value stops one step short of final: final + (base - final) * (1 + cos(pi (L-1) / L)) / 2
    L = epochs * spe - w
    assert s[-1] == pytest.approx(final + (base - final) * (1 + math.cos(math.pi * (L - 1) / L)) / 2)
    assert final < s[-1] < final + 1e-5


def test_cosine_schedule_midpoint_and_increasing_direction():
    # Teacher momentum 0.996 -> 1 without warm-up: at i = L / 2, cos(pi / 2) = 0, so the value is the mean.
    s = cosine_schedule(0.996, 1.0, epochs=4, steps_per_epoch=5)
    assert len(s) == 20 and s[0] == pytest.approx(0.996)
    assert s[10] == pytest.approx((0.996 + 1.0) / 2)  # 0.998
    assert np.all(np.diff(s) > 0) and np.all(s < 1.0)


def test_cosine_schedule_all_warmup():
    s = cosine_schedule(1.0, 0.0, epochs=2, steps_per_epoch=2, warmup_epochs=2, start_warmup_value=0.1)
    assert s.tolist() == pytest.approx([0.1, 0.4, 0.7, 1.0])  # linspace(0.1, 1.0, 4)


@pytest.mark.parametrize("kwargs, name", [
    (dict(epochs=-1, steps_per_epoch=2), "epochs"),
    (dict(epochs=0, steps_per_epoch=2), "epochs"),
    (dict(epochs=2, steps_per_epoch=0), "steps_per_epoch"),
    (dict(epochs=2, steps_per_epoch=1, warmup_epochs=3), "warmup_epochs"),
    (dict(epochs=2, steps_per_epoch=1, warmup_epochs=-1), "warmup_epochs"),
    (dict(epochs=2.5, steps_per_epoch=1), "epochs"),
])
def test_cosine_schedule_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        cosine_schedule(1.0, 0.0, **kwargs)


def test_teacher_temperature_warms_up_then_stays():
    # linspace(0.04, 0.07, 4) has step 0.03 / 3 = 0.01
    assert linear_warmup_then_constant(0.04, 0.07, 4, 6).tolist() == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    assert linear_warmup_then_constant(0.04, 0.07, 0, 2).tolist() == [0.07, 0.07]
    # The released ViT-S run: 30 warm-up epochs of 800; epoch 15 is 0.04 + 0.03 * 15 / 29.
    temps = linear_warmup_then_constant(0.04, 0.07, 30, 800)
    assert len(temps) == 800 and temps[0] == 0.04 and temps[29] == pytest.approx(0.07)
    assert temps[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert np.all(np.diff(temps[:30]) > 0) and np.all(temps[29:] == 0.07)


@pytest.mark.parametrize("args, name", [
    ((0.04, 0.07, 3, 2), "warmup_epochs"),
    ((0.04, 0.07, -1, 2), "warmup_epochs"),
    ((0.04, 0.07, 0, -2), "epochs"),
])
def test_teacher_temperature_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        linear_warmup_then_constant(*args)
