"""Decode attention as a C++ kernel (csrc/decode_attention.cpp), built on first use for this machine.

At decode each row has one query; torch's batched matmuls then spend most of the attention on
per-matrix overhead (a 3 x 64 by 64 x span product per key/value head of each row) and SDPA's flash
kernel is slower still. The kernel runs one task per (row, key/value head): it reads the row's own
positions of K once for the query heads that share them, takes the softmax in fp32 and reads V once.
Measured on the default model, 2-core Zen 4, bf16, kernel and bmm decoders alternating in one process:
a 16-row decode step at ~100 positions 20.2 -> 19.6 ms, one row at ~300 positions 11.1 -> 10.3 ms; one
layer's attention at 16 rows from a cold cache 101-107 us against 150-162 us for bmm + mask + softmax.
With AVX-512 BF16 (head size a multiple of 32) the scores of 16 positions come from bf16 dot products
summed together, exp is a vector polynomial and the probabilities (bf16, as the batched-matmul path
rounds them) multiply V two positions a step: one layer at 16 rows over ~100 warm positions 53 -> 35
us, a decode step's attention 2.9 -> 2.4-2.7 ms (the rest is reading the cache from memory;
prefetching keys ahead made no clear difference). bf16 only.

Built with lorakit's other kernels on first use (kernels/native.py); where that fails, `load` returns
None and the decoder keeps its batched matmuls."""

from __future__ import annotations

from typing import Callable

import torch

from lorakit.kernels import native

DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
_fake_registered = False


def load(portable: bool = False) -> DecodeAttention | None:
    """The kernel as `torch.ops.lorakit_kernels.decode_attention` (q (B, KVH, G, D), keys, values
    (S >= B, KVH, C, D), lengths (B), scale) -> (B, KVH, G, D); None where it cannot be built.
    `portable`: the build without this CPU's vector extensions (kernels/native.py), for tests."""
    global _fake_registered
    ops = native.ops(portable)
    if ops is None:
        return None
    if not portable and not _fake_registered:  # its output's shape, for torch.compile's tracing
        torch.library.register_fake(f"{native.NAMESPACE}::decode_attention", _shape)
        _fake_registered = True
    return ops.decode_attention.default


def _shape(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


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
