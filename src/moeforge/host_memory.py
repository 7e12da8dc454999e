"""Keep freed host memory in the process instead of handing it back to the OS after every step.

PyTorch's CPU allocator has no cache: every tensor is a malloc/free. glibc serves blocks above its
mmap threshold with a fresh mmap and unmaps them on free, and trims the heap top past its trim
threshold, so a training step on the CPU faults the same pages in again and again, each zeroed by
the kernel. For the `tiny` preset on 2 CPU cores that was about 14,000-21,000 page faults and 50-80
ms of system time per step (docs/tiny.md). Raising both thresholds keeps the blocks for reuse: the
resident size stays at the run's peak rather than dropping between steps.

Applied by the command line (`moeforge train|eval|generate|bench`), on Linux with glibc only, and
not when the user set glibc's own MALLOC_* tunables in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2, which is 32 MiB on 64-bit systems;
# larger blocks are always mapped and unmapped.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free heap top
TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time
_USER_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process. True if applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _USER_TUNABLES):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    ok &= libc.mallopt(_M_TOP_PAD, TOP_PAD) == 1
    return bool(ok)
