"""Dense views of quantized weights, so merge code needs no per-backend copy."""

from __future__ import annotations

import torch
from torch import nn


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a plain float tensor; bitsandbytes 4-bit / 8-bit weights are dequantized."""
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    if type(weight).__name__ == "Int8Params":
        scb = getattr(weight, "SCB", None) or getattr(module.state, "SCB", None)
        return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)
    return weight
