"""A LoraModel folded into a dense transformers model, whatever its base's storage.

The base is dequantized exactly (to fp32), the adapter added in fp32 and the sum stored in the dtype
asked for, so the merged weights are the ones the adapter was trained against, rounded once."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.lora.merge import merge_and_unload
from lorakit.lora.model import unwrap_model
from lorakit.quant.requantize import dequantize_model


def merge_to_dense(model: nn.Module, dtype: torch.dtype = torch.bfloat16, safe_merge: bool = True,
                   adapter_names: list[str] | None = None) -> nn.Module:
    """A LoraModel (on a quantized or plain base) as a dense transformers model in `dtype`: adapters
    folded in fp32 into the dequantized weights, every other quantized layer dequantized too."""
    inner = unwrap_model(model)
    merged = merge_and_unload(inner, safe_merge=safe_merge, adapter_names=adapter_names, dtype=dtype)
    return dequantize_model(merged, dtype)
