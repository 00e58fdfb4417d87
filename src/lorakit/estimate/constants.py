"""The estimate's fitted constants: what the meta-device measurement cannot see (the Python process,
recomputation under checkpointing, the allocator), each fitted to measured peaks."""

from __future__ import annotations

FRAMEWORK_BYTES = 450_000_000
"""Resident memory of a Python process with torch, transformers and bitsandbytes imported (CPU)."""
RECOMPUTE_FACTOR = 8
"""Under checkpointing, backward holds a recomputed layer's saved tensors, their gradients and the
recompute's own temporaries (dequantized weights, fp32 gradient buffers) at once: about 8x the
layer's saved tensors, fitted with HEAP_RETENTION to measured peaks (bench/qlora_memory.py: 135M and
1.1B Llamas, bf16 and nf4, 4 x 512; all four within 5%)."""
HEAP_RETENTION = {"glibc": 1.15, "mmap": 1.0}
"""Resident bytes per byte of live activations. glibc, left as it is (as `lorakit train` leaves it),
serves activations from its heap after the first large free and keeps some of what is freed (1.15x,
fitted as above; it was ~1.6x before the head loss reused its chunk buffers). With a fixed 1 MB mmap
threshold (bench/malloc.py) freed activations go back to the OS and RSS tracks what is live."""
