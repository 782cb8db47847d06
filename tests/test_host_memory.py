"""cribo.train.host_memory: after keep_freed_host_memory(), a large freed tensor stays in the process.

glibc serves a block above its mmap threshold (128 KiB by default, dynamically at most 32 MiB) with
its own mmap and returns it to the kernel on free; with the setting, the block comes from the heap
and the heap is not trimmed, so freeing it changes neither the mapped blocks (mallinfo2.hblkhd) nor
the arena size. Each case runs in a fresh interpreter: mallopt changes the whole process.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt and mallinfo2 are glibc's")

PROBE = r"""
import ctypes, sys
import torch
from cribo.train.host_memory import keep_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else False
size = 96 * 2**20
before = libc.mallinfo2()
block = torch.empty(size // 4, dtype=torch.float32)
block.fill_(1.0)
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(applied, during.hblkhd - before.hblkhd, during.arena - before.arena, after.arena - before.arena)
"""


def _probe(mode: str) -> tuple[bool, int, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
    applied, mapped, arena_during, arena_after = out.stdout.split()
    return applied == "True", int(mapped), int(arena_during), int(arena_after)


def test_default_glibc_maps_a_large_block_and_unmaps_it():
    applied, mapped, arena_during, _ = _probe("default")
    assert not applied
    assert mapped >= 96 * 2**20  # its own mapping
    assert arena_during < 96 * 2**20  # not from the heap


def test_kept_host_memory_serves_large_blocks_from_the_heap_and_keeps_them():
    applied, mapped, arena_during, arena_after = _probe("keep")
    assert applied
    assert mapped < 96 * 2**20  # no mapping of its own
    assert arena_during >= 96 * 2**20  # the heap grew by the block
    assert arena_after == arena_during  # and was not trimmed when it was freed


@pytest.mark.parametrize("enabled, calls", [(True, 1), (False, 0)])
def test_the_engine_keeps_freed_memory_on_cpu_when_configured(tmp_path, monkeypatch, enabled, calls):
    from cribo.config import validate_run_config
    from cribo.train import engine

    seen = []
    monkeypatch.setattr(engine, "keep_freed_host_memory", lambda: seen.append(True) or True)
    # the untrained "random" method: the engine's set-up and a checkpoint, no data read
    cfg = validate_run_config({"method": "random", "data": {"dataset": "voc", "root": str(tmp_path)},
                               "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1,
                                         "embed_dim": 32, "num_heads": 2},
                               "train": {"device": "cpu", "progress": False, "threads": 1,
                                         "keep_freed_host_memory": enabled}})
    engine.train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint.pth").is_file()
    assert len(seen) == calls


@pytest.mark.parametrize("enabled", [True, False])
def test_training_checks_the_fragmentation_guard_after_every_step(tmp_path, monkeypatch, enabled):
    from conftest import write_voc

    from cribo.config import validate_run_config
    from cribo.train import engine, host_memory

    guards = []

    class RecordingGuard(host_memory.FragmentationGuard):
        def __init__(self):
            super().__init__()
            self.calls = 0
            guards.append(self)

        def after_step(self):
            self.calls += 1
            return super().after_step()

    monkeypatch.setattr(engine, "keep_freed_host_memory", lambda: True)  # this process's allocator is left alone
    monkeypatch.setattr(engine, "FragmentationGuard", RecordingGuard)
    root = write_voc(tmp_path / "voc", {"train": [f"t{i}" for i in range(6)], "val": ["v0"]})
    cfg = validate_run_config({
        "method": "dino", "seed": 0, "data": {"dataset": "voc", "root": str(root), "split": "train"},
        "model": {"arch": "vit_tiny", "patch_size": 8, "img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2},
        "dino": {"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8, "warmup_teacher_temp_epochs": 0,
                 "local_crops_number": 0},
        "optim": {"epochs": 2, "batch_size": 3, "warmup_epochs": 0},
        "train": {"device": "cpu", "num_workers": 0, "progress": False, "threads": 1,
                  "keep_freed_host_memory": enabled}})
    engine.train(cfg, tmp_path / "run")
    if enabled:
        assert len(guards) == 1 and guards[0].calls == 4  # 2 epochs x 2 steps
    else:
        assert guards == []


def test_fragmentation_guard_trims_once_the_resident_size_passes_its_bound(monkeypatch):
    """Baseline = resident size after the warm-up steps; a trim whenever it exceeds (1 + slack) x baseline."""
    from cribo.train import host_memory

    trims = []

    class FakeLibc:
        def malloc_trim(self, pad):
            trims.append(pad)
            return 1

    # after each step, and again right after each trim (in brackets); step 1 is larger: only the
    # warm-up's last step counts
    sizes = iter([500, 100, 100, 119, 121, (80), 90, 125, (130), 150, 157, (100)])
    monkeypatch.setattr(host_memory, "resident_bytes", lambda: next(sizes))
    guard = host_memory.FragmentationGuard(slack=0.2, warmup_steps=3)
    guard.libc = FakeLibc()
    results = [guard.after_step() for _ in range(9)]
    # 119 <= 120 < 121: trim, 80 left; 125 > 120: trim, but 130 stays in use, so the bound becomes 156;
    # 150 <= 156 < 157: trim
    assert results == [False, False, False, False, True, False, True, False, True]
    assert trims == [0, 0, 0] and guard.trims == 3 and guard.baseline == 130


def test_fragmentation_guard_is_inert_without_glibc_and_checks_its_settings(monkeypatch):
    from cribo.train import host_memory

    guard = host_memory.FragmentationGuard()
    guard.libc = None
    assert not any(guard.after_step() for _ in range(10)) and guard.trims == 0
    with pytest.raises(ValueError, match="slack"):
        host_memory.FragmentationGuard(slack=0)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":  # the real call, on this machine
        real = host_memory.FragmentationGuard(slack=0.5, warmup_steps=1)
        assert real.after_step() is False
        assert real.baseline > 0
