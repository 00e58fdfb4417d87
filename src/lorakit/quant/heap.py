"""Give the C heap's free pages back to the OS after a quantized load (glibc's malloc_trim)."""

from __future__ import annotations

import ctypes
import sys


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc only). Quantizing on load frees every
    full-precision tensor it read, in small pieces the allocator keeps: ~0.45 GB of resident memory
    for the 135M default model, more for larger ones."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
            pass
