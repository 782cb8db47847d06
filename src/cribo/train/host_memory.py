"""Keep freed host memory in the process for the next step instead of handing it back to the kernel.

A CPU training step allocates and frees the same large tensors every step (a CrIBo step at issue 14's
shapes: ``rows x 65536`` logits, softmaxes and their gradients, 20-70 MiB each). glibc serves every
block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on free, so each
step pays the page faults and zeroing of those pages again: at those shapes this was a third of the
step's wall time, most of it system time. ``mallopt(M_MMAP_MAX, 0)`` makes glibc carve large blocks
from its heap, and a high ``M_TRIM_THRESHOLD`` keeps the freed top of the heap mapped, so the next
step reuses warm pages. Over the first steps peak RSS stays close to that of the largest step
(measured: +3 to +7 % at issue 14's shapes); over longer runs fragmentation of the kept memory
grows it, which :class:`FragmentationGuard` bounds.

PyTorch has no CPU caching allocator outside its mobile build, and jemalloc/tcmalloc would need a
system library preloaded before Python starts; ``mallopt`` is glibc's own switch and can be flipped
from a running process, so it is done here, with ``ctypes``. Elsewhere (musl, macOS) nothing changes.
GPU tensors are not concerned: the CUDA caching allocator already reuses its blocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_host_memory() -> bool:
    """Tell glibc to serve large blocks from its heap and not to trim it; True if glibc took both settings."""
    libc = _glibc()
    if libc is None:
        return False
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1


def _glibc():
    """glibc with ``mallopt`` and ``malloc_trim`` typed, or None (another system or C library)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def resident_bytes() -> int | None:
    """This process's resident set size (``/proc/self/statm``); None where there is no such file."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class FragmentationGuard:
    """Bounds the host memory that :func:`keep_freed_host_memory` lets fragmentation take.

    With large blocks carved from the heap, a step's freed blocks are reused by the next step, but
    not perfectly: tensors whose sizes change from step to step (CrIBo's object rows) and small
    blocks that outlive a step split the free space, so the heap grows. At issue 14's shapes the
    resident size went from 2,723 MiB after 13 steps to 3,811 MiB after 90 (then flat); with
    oneDNN's products (:mod:`cribo.models.fast_linear`), whose scratch buffers come from the same
    heap, it kept growing (5,962 MiB after 150 steps).

    Call :meth:`after_step` once per training step. After ``warmup_steps`` steps it records the
    resident set size as the baseline (the model, the optimiser and one step's working set);
    whenever the resident size later exceeds ``(1 + slack)`` times the baseline, it calls glibc's
    ``malloc_trim(0)``, which hands every free page back to the kernel. The next step pays the page
    faults of its working set once more (~0.3 s at issue 14's shapes). If the resident size right
    after a trim is above the baseline (memory in use, not fragmentation), it becomes the baseline.
    Does nothing where glibc is not the allocator.
    """

    def __init__(self, slack: float = 0.2, warmup_steps: int = 3):
        if slack <= 0 or warmup_steps < 1:
            raise ValueError(f"slack must be > 0 and warmup_steps >= 1, got {slack} and {warmup_steps}")
        self.slack, self.warmup_steps = slack, warmup_steps
        self.libc = _glibc()
        self.steps, self.trims, self.baseline = 0, 0, None

    def after_step(self) -> bool:
        """True if this call trimmed the heap."""
        if self.libc is None:
            return False
        self.steps += 1
        rss = resident_bytes()
        if rss is None:
            return False
        if self.steps == self.warmup_steps:
            self.baseline = rss
        elif self.baseline is not None and rss > (1 + self.slack) * self.baseline:
            self.libc.malloc_trim(0)
            self.trims += 1
            # memory in use that grew for good (not free pages) stays after the trim: the bound follows
            # it, or every later step would trim again
            self.baseline = max(self.baseline, resident_bytes() or 0)
            return True
        return False
