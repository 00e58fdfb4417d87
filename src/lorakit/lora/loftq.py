"""LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659): start the adapter from what quantization loses.

Alternate `iterations` times: Q = quantize(W - B A), then B A = the rank-r SVD of W - dequantize(Q). The
layer keeps dequantize(Q) as its weight, which quantizes back to Q exactly (its block maxima are
representable), so loading that base in NF4 and adding the adapter gives about W, not W's quantization.
The arithmetic is peft 0.21's `loftq_init` (NF4 blocks of 64 without double quantization, or LLM.int8
rows) on bitsandbytes' own quantizers; it runs on any device bitsandbytes runs on, peft's needs a GPU.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, rank: int, bits: int = 4, iterations: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized Q, A, B) for `weight` (out, in) in fp32: A (rank, in), B (out, rank), B A ~ W - Q.

    As in peft, B A is not divided by the adapter's scaling: with lora_alpha != r the start is off by
    that factor in both tools (peft's LoftQ recipe uses lora_alpha = r)."""
    import bitsandbytes.functional as functional  # here: ~1 s to import, and only LoftQ needs it

    residual = weight.clone()
    for step in range(iterations):
        if bits == 4:
            codes, state = functional.quantize_4bit(residual, blocksize=64, compress_statistics=False, quant_type="nf4")
            dequantized = functional.dequantize_4bit(codes, state).float()
        else:
            codes, row_scales, _ = functional.int8_vectorwise_quant(residual)
            dequantized = functional.int8_vectorwise_dequant(codes, row_scales).float()
        lora_b, lora_a = low_rank(weight - dequantized, rank)
        if step + 1 == iterations:
            break
        residual = weight - lora_b @ lora_a
    return dequantized, lora_a, lora_b


def low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R the best rank-`rank` approximation of `matrix`: U sqrt(S) and sqrt(S) V^T."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(s[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]
