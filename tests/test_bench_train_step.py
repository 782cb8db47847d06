"""The training-step benchmark runs on the engine's current interfaces (it is not imported by the package, so
nothing else would notice an interface change breaking it) and reports what it promises."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"


def test_bench_train_step_runs_a_tiny_step_and_prints_every_phase():
    # 64 px at patch 16 = 4 x 4 tokens per view, K = 4 objects; 256-wide heads keep it to seconds
    out = subprocess.run([sys.executable, str(SCRIPT), "--preset", "issue", "--img", "64", "--clusters", "4",
                          "--out-dim", "256", "--steps", "1", "--warmup", "1", "--threads", "1", "--count-flops",
                          "--profile-matmuls", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "images/s" in out.stdout and "peak RSS" in out.stdout
    phases = next(line for line in out.stdout.splitlines() if line.startswith("phase ms/step:"))
    flops = next(line for line in out.stdout.splitlines() if line.startswith("FLOPs per step"))
    assert float(flops.split(":")[1].split("GFLOP")[0]) > 0
    products = next(line for line in out.stdout.splitlines() if line.startswith("matrix products"))
    matmul_ms, rest_ms = float(products.split()[2]), float(products.split()[6])
    assert matmul_ms > 0 and rest_ms > 0, products  # both kinds of work happen in a step
    times = dict(zip(phases.split()[2::2], map(float, phases.split()[3::2])))
    assert set(times) >= {"data", "backbone", "clustering", "bank", "heads", "losses", "backward", "optimizer", "ema"}
    # every wrapped function is still called by the step (a renamed one would leave its phase at 0)
    for phase in ("backbone", "clustering", "bank", "heads", "losses", "backward", "optimizer", "ema"):
        assert times[phase] > 0, (phase, phases)


def test_bench_official_step_names_the_missing_clone():
    script = SCRIPT.with_name("bench_official_step.py")
    out = subprocess.run([sys.executable, str(script), "--official", "/nonexistent/CrIBo"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "/nonexistent/CrIBo" in out.stderr and "tileb1/CrIBo" in out.stderr
