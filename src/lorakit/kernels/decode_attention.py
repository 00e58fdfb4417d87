"""Decode attention as a C++ kernel (csrc/decode_attention.cpp), built on first use for this machine.

At decode each row has one query; torch's batched matmuls then spend most of the attention on
per-matrix overhead (a 3 x 64 by 64 x span product per key/value head of each row) and SDPA's flash
kernel is slower still. The kernel runs one task per (row, key/value head): it reads the row's own
positions of K once for the query heads that share them, takes the softmax in fp32 and reads V once.
Measured on the default model, 2-core Zen 4, bf16, kernel and bmm decoders alternating in one process:
a 16-row decode step at ~100 positions 20.2 -> 19.6 ms, one row at ~300 positions 11.1 -> 10.3 ms; one
layer's attention at 16 rows from a cold cache 101-107 us against 150-162 us for bmm + mask + softmax.
It is bound by memory latency (~12 GB/s; prefetching the next task's rows did not help). bf16 only.

Building needs a C++ compiler and ninja (torch.utils.cpp_extension: ~7 s, cached under
~/.cache/torch_extensions); where either is missing, `load` says why once and returns None, and the
decoder keeps its batched matmuls."""

from __future__ import annotations

import hashlib
import platform
import warnings
from pathlib import Path
from typing import Callable

import torch

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]  # built where it runs: the machine's own vector units

DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
_loaded: DecodeAttention | None = None
_failed: str | None = None


def load() -> DecodeAttention | None:
    """The kernel as `torch.ops.lorakit_kernels.decode_attention` (q (B, KVH, G, D), keys, values
    (S >= B, KVH, C, D), lengths (B), scale) -> (B, KVH, G, D); None where it cannot be built."""
    global _loaded, _failed
    if _loaded is not None or _failed is not None:
        return _loaded
    try:
        from torch.utils.cpp_extension import load as build

        # -march=native: one build per kind of CPU, so a cache shared between machines never runs another's code.
        machine = hashlib.sha1(f"{platform.machine()} {_cpu_model()} {FLAGS}".encode()).hexdigest()[:8]
        build(name=f"lorakit_decode_attention_{machine}", sources=[str(SOURCE)], extra_cflags=FLAGS,
              extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        torch.library.register_fake("lorakit_kernels::decode_attention", _shape)
        _loaded = torch.ops.lorakit_kernels.decode_attention.default
    except Exception as error:  # no compiler, no ninja, an unusual platform: the batched matmuls stay
        _failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(f"building lorakit's decode-attention kernel failed ({_failed}); decoding uses batched matmuls",
                      stacklevel=2)
    return _loaded


def _shape(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


def _cpu_model() -> str:
    """The CPU's model name and instruction-set flags (a VM can hide flags of the same model)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags")]
    return " ".join(wanted) or platform.processor()


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel's arithmetic in plain torch (fp32), row by row: its oracle in tests."""
    rows, kv_heads, groups, dim = q.shape
    out = torch.empty(rows, kv_heads, groups, dim, dtype=torch.float32)
    for b in range(rows):
        n = int(lengths[b])
        k, v = keys[b, :, :n].float(), values[b, :, :n].float()  # (KVH, n, D)
        scores = q[b].float() @ k.transpose(1, 2) * scale  # (KVH, G, n)
        out[b] = torch.softmax(scores, dim=-1) @ v
    return out.to(q.dtype)
