"""Which kind of weight a tensor is: dense, or bitsandbytes' packed 4-bit (`Params4bit`) / 8-bit
(`Int8Params`). Every other module asks here instead of checking type names."""

from __future__ import annotations

from enum import Enum

import torch


class WeightKind(str, Enum):
    DENSE = "dense"
    NF4 = "4bit"  # bitsandbytes Params4bit (nf4 or fp4)
    INT8 = "int8"  # bitsandbytes Int8Params (LLM.int8)


def weight_kind(param: torch.Tensor | None) -> WeightKind:
    # By type name: importing bitsandbytes costs ~1 s, and a model without packed weights never needs it.
    name = type(param).__name__
    if name == "Params4bit":
        return WeightKind.NF4
    if name == "Int8Params":
        return WeightKind.INT8
    return WeightKind.DENSE


def is_quantized(param: torch.Tensor | None) -> bool:
    """True for bitsandbytes' packed weights (4-bit or 8-bit)."""
    return weight_kind(param) is not WeightKind.DENSE


def is_4bit(param: torch.Tensor | None) -> bool:
    return weight_kind(param) is WeightKind.NF4
