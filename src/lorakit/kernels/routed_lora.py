"""Each row's own adapters onto a fused projection's output, as a C++ kernel (csrc/routed_lora.cpp).

A mixed batch done as dense matmuls over the adapter banks (infer/packed.py) computes every loaded
adapter for every row: on the default model, 16 rows over 8 adapters, a fifth more arithmetic than
the base in a decode step, nearly all of it multiplied by zero scales. The kernel follows Punica's
gathered matrix-vector idea: row n reads only its own slots' A and B and adds
sum_j w_j B_{s_j} (A_{s_j} x_n) onto the base output in fp32, rounding once. AVX-512 BF16 dot products
where the CPU has them (bf16 products are exact in fp32), plain loops elsewhere.

Rows run in order of their slot, so each thread reads few adapters' banks from memory. Measured on a
2-core Zen 4 (bf16, default model, 16 rows over 8 adapters of rank 16): q/k/v with warm caches, base
matmul + kernel 46 us against 82 us for the fused matmul with A banks plus the block-diagonal B matmul
(the base matmul alone 32 us); a whole decode step 20.7 -> 19.0 ms (base alone 17.2), the kernel's 60
calls 1.0 ms of it (1.3 ms before the rows were ordered by slot)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lorakit.kernels import native

RoutedLora = Callable[..., None]


def load(portable: bool = False) -> RoutedLora | None:
    """`torch.ops.lorakit_kernels.routed_lora_(out, x, a, b, segments, slots, weights)`, updating
    `out` in place (arguments as `layout` and `reference` describe); None where it cannot be built.
    `portable`: the build without this CPU's vector extensions (kernels/native.py), for tests."""
    ops = native.ops(portable)
    return None if ops is None else ops.routed_lora_.default


def layout(banks: Sequence[tuple[torch.Tensor, torch.Tensor] | None], sizes: Sequence[int],
           slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's (a, b, segments) for a group of layers whose outputs sit side by side (`sizes`):
    `banks[t]` is layer t's (A bank (S*R, in), scaled B bank (out, S*R)) over `slots` slots of rank R,
    None for a layer without adapters. a: (S, T*R2, in), each slot's A rows for the T adapted layers;
    b: (S, R2/2, W, 2), each slot's B with layer t's in its own columns and ranks in pairs (R2: R
    rounded up to even, the pairs AVX-512 BF16 multiplies at once); segments: (T, 2), layer t's first
    output column and width."""
    present = [(t, bank) for t, bank in enumerate(banks) if bank is not None]
    rank = present[0][1][0].shape[0] // slots
    paired = rank + rank % 2
    inputs, dtype = present[0][1][0].shape[1], present[0][1][0].dtype
    a = torch.zeros(slots, len(present), paired, inputs, dtype=dtype)
    b = torch.zeros(slots, paired, sum(sizes), dtype=dtype)
    segments = []
    for index, (t, (a_bank, b_bank)) in enumerate(present):
        first = sum(sizes[:t])
        a[:, index, :rank] = a_bank.view(slots, rank, inputs)
        b[:, :rank, first : first + sizes[t]] = b_bank.view(sizes[t], slots, rank).permute(1, 2, 0)
        segments.append((first, sizes[t]))
    pairs = b.view(slots, paired // 2, 2, sum(sizes)).transpose(2, 3).contiguous()
    return a.view(slots, len(present) * paired, inputs), pairs, torch.tensor(segments, dtype=torch.long)


def reference(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, segments: torch.Tensor,
              slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """What the kernel makes of `out`, in plain torch (fp32 sums, rounded once): its oracle in tests.
    out (N, W), x (N, in), N = B rows x tokens; slots, weights (J, B)."""
    rows = slots.shape[1]
    tokens = x.shape[0] // rows
    paired = b.shape[1] * 2
    dense_b = b.transpose(2, 3).reshape(b.shape[0], paired, b.shape[2]).float()  # (S, R2, W)
    result = out.float().clone()
    for n in range(x.shape[0]):
        for slot, weight in zip(slots[:, n // tokens].tolist(), weights[:, n // tokens].tolist()):
            if slot == 0 or weight == 0:
                continue
            xa = (a[slot - 1].float() @ x[n].float() * weight).bfloat16().float()  # (T*R2,), rounded as the kernel does
            for t, (first, size) in enumerate(segments.tolist()):
                result[n, first : first + size] += xa[t * paired : (t + 1) * paired] @ dense_b[slot - 1, :, first : first + size]
    return result.to(out.dtype)
