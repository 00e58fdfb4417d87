"""What differs per kind of base layer LoRA wraps: dense nn.Linear, GPT-2's Conv1D, bitsandbytes 4-bit
(`Params4bit`) and 8-bit (`Int8Params`). Every other module asks here instead of checking type names."""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant.dequant import dequantize_int8, dequantize_params4bit


class WeightKind(str, Enum):
    DENSE = "dense"
    NF4 = "4bit"  # bitsandbytes Params4bit (nf4 or fp4)
    INT8 = "int8"  # bitsandbytes Int8Params (LLM.int8)


def weight_kind(param: torch.Tensor | None) -> WeightKind:
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


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored transposed, as (in, out)."""
    return type(module).__name__ == "Conv1D"


def layer_shape(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer: nn.Linear, bitsandbytes' Linear4bit /
    Linear8bitLt (both nn.Linear subclasses) or GPT-2's Conv1D (weight stored as in x out)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if is_conv1d(base):
        in_features, out_features = base.weight.shape
        return in_features, out_features
    raise LorakitError(
        f"cannot put LoRA on a {type(base).__name__}; lorakit adapts Linear and Conv1D layers, so pick those in target_modules"
    )


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The module's weight as a plain float tensor in its stored layout; bitsandbytes 4-bit / 8-bit
    weights are dequantized (to fp32 unless `dtype` says otherwise), anything else is returned as stored."""
    weight = module.weight
    kind = weight_kind(weight)
    if kind is WeightKind.NF4:
        return dequantize_params4bit(weight, dtype or torch.float32)
    if kind is WeightKind.INT8:
        return dequantize_int8(module, dtype or torch.float32)
    return weight if dtype is None else weight.to(dtype)


def parameter_count(param: torch.Tensor) -> int:
    """Parameters as peft counts them: a 4-bit weight holds two values per packed byte."""
    count = param.numel()
    return count * 2 * param.element_size() if is_4bit(param) else count
