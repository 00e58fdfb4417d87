"""Byte counts that follow from a format's layout alone: weights per storage format, the checkpoint on
disk, and lorakit's chunked head loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.dtypes import DTYPES
from lorakit.train.loss import LOSS_CHUNK

NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Packed 4-bit codes plus block scales: one absmax per 64 weights, itself 8-bit with an fp32
    scale per 256 blocks under double quantization (bitsandbytes' layout), plus the code tables."""
    blocks = math.ceil(numel / NF4_BLOCK)
    if double_quant:
        scales = blocks + 4 * math.ceil(blocks / NF4_SCALE_BLOCK) + 256 * 4 + 4
    else:
        scales = 4 * blocks
    return math.ceil(numel / 2) + scales + 16 * 4


def int8_bytes(weight_shape: torch.Size) -> int:
    return weight_shape.numel() + 4 * weight_shape[0]  # codes + one fp32 absmax per row


def weights_by_format(params: int, quantizable: list[nn.Linear]) -> dict[str, int]:
    """Model weights stored fp32 / bf16 / int8 / nf4+dq; quantized formats keep the rest in bf16."""
    q_numel = sum(m.weight.numel() for m in quantizable)
    rest = 2 * (params - q_numel)
    return {
        "fp32": 4 * params,
        "bf16": 2 * params,
        "int8": rest + sum(int8_bytes(m.weight.shape) for m in quantizable),
        "nf4+dq": rest + sum(nf4_bytes(m.weight.numel()) for m in quantizable),
    }


def checkpoint_bytes_per_param(config) -> int:
    """Bytes per parameter of the checkpoint on disk, from config.json's dtype (fp32 when unstated)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    stored = DTYPES.get(str(dtype).removeprefix("torch."))
    return stored.itemsize if stored is not None else 4


def head_loss_bytes(tokens: int, hidden: int, vocab: int) -> int:
    """lorakit's chunked head loss: the selected hidden states and their gradient (bf16), and its chunk
    buffers: logits and gradient in bf16 plus fp32 log-probabilities (8 bytes per chunk entry)."""
    chunk = min(LOSS_CHUNK, tokens)
    return 2 * tokens * hidden * 2 + chunk * vocab * (4 + 4)
