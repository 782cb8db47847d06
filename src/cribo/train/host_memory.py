"""Keep freed host memory in the process for the next step instead of handing it back to the kernel.

A CPU training step allocates and frees the same large tensors every step (a CrIBo step at issue 14's
shapes: ``rows x 65536`` logits, softmaxes and their gradients, 20-70 MiB each). glibc serves every
block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on free, so each
step pays the page faults and zeroing of those pages again: at those shapes this was a third of the
step's wall time, most of it system time. ``mallopt(M_MMAP_MAX, 0)`` makes glibc carve large blocks
from its heap, and a high ``M_TRIM_THRESHOLD`` keeps the freed top of the heap mapped, so the next
step reuses warm pages. Peak RSS stays close to that of the largest step (measured: +3 to +7 % at
issue 14's shapes).

PyTorch has no CPU caching allocator outside its mobile build, and jemalloc/tcmalloc would need a
system library preloaded before Python starts; ``mallopt`` is glibc's own switch and can be flipped
from a running process, so it is done here, with ``ctypes``. Elsewhere (musl, macOS) nothing changes.
GPU tensors are not concerned: the CUDA caching allocator already reuses its blocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_host_memory() -> bool:
    """Tell glibc to serve large blocks from its heap and not to trim it; True if glibc took both settings."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
