"""Give freed activation memory back to the OS between steps.

glibc serves large allocations with mmap until the first such block is freed; then it raises its
mmap threshold (up to 32 MB) and later activations come from the heap, where freed memory mostly
stays in the process. On the default model that grew RSS by 0.5 GB from the first training step to
the second. A fixed 1 MB threshold keeps large tensors on mmap, returned to the OS when freed.

lorakit does not call this: every step then faults its activation pages in afresh, which cost more
speed than the ~0.4 GB of peak RSS it saved on the default model. bench/qlora_memory.py --malloc mmap
uses it to compare allocators (and `lorakit estimate --allocator mmap` models it)."""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 20


def return_large_frees_to_os() -> bool:
    """Fix glibc's mmap threshold at 1 MB; False where there is no glibc (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
