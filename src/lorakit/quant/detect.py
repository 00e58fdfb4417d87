"""Recognise a quantized model: its bitsandbytes layers and the QuantConfig it was loaded with."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.dtypes import DTYPES, dtype_name
from lorakit.quant.config import QuantConfig
from lorakit.weights.kinds import is_4bit, is_quantized


def is_quantized_layer(module: nn.Module) -> bool:
    """bitsandbytes' Linear4bit / Linear8bitLt (nn.Linear subclasses holding a packed weight)."""
    return isinstance(module, nn.Linear) and is_quantized(module.weight)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every bitsandbytes 4-bit / 8-bit linear layer, by module path."""
    return {name: m for name, m in model.named_modules() if is_quantized_layer(m)}


def detect_quantization(model: nn.Module) -> QuantConfig:
    """The QuantConfig a loaded model was quantized with (quantization "none" for a plain model)."""
    for module in model.modules():
        if is_quantized_layer(module):
            return _layer_quantization(module)
    return QuantConfig()


def _layer_quantization(module: nn.Linear) -> QuantConfig:
    weight = module.weight
    if not is_4bit(weight):
        return QuantConfig(quantization="int8")
    state = weight.quant_state
    compute = getattr(module, "compute_dtype", None) or torch.bfloat16
    name = dtype_name(compute) if compute in DTYPES.values() else "bfloat16"
    if state is not None:
        nested = bool(getattr(state, "nested", False) or getattr(state, "original_nested", False))
    else:
        nested = weight.compress_statistics
    return QuantConfig(quantization=weight.quant_type, double_quant=nested, compute_dtype=name)
