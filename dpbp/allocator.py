"""Keep freed memory in the process instead of handing it back to the OS after every batch.

glibc's malloc serves large requests (a batch's activations, a received message) with mmap and
trims the top of the heap after large frees, so each training step page-faults the same memory
back in: measured on ResNet-20 (batch 128, CPU), that is 10-12 s of system time per 4-epoch run
of `algo=bp gpus=2`, against 2.8 s with the thresholds below (results/profile_cpu_overhead.md).
Fixed thresholds also turn off glibc's dynamic adjustment, so every process of a run (and the
one-process baseline it is compared with) allocates the same way. The memory a run holds stays at
its peak, which is what a training loop needs again at the next step anyway.

Set DPBP_KEEP_FREED_MEMORY=0 to keep glibc's defaults (for comparisons).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: bigger requests (whole datasets) still use mmap
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


def keep_freed_memory() -> bool:
    """Tune glibc's malloc in this process (Linux); return whether it was tuned."""
    if sys.platform != "linux" or os.environ.get("DPBP_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD)))
