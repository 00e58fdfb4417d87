"""What LoRA needs to know about the layer it wraps: dense nn.Linear, GPT-2's Conv1D or bitsandbytes'
Linear4bit / Linear8bitLt. The weight's kind and dense values live one floor down, in lorakit.weights."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.weights.kinds import is_4bit


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


def parameter_count(param: torch.Tensor) -> int:
    """Parameters as peft's trainable-parameter report counts them: a 4-bit weight holds two values per packed byte."""
    count = param.numel()
    return count * 2 * param.element_size() if is_4bit(param) else count
