"""Load a base model quantized through transformers' `BitsAndBytesConfig`.

The weights are read once, shard by shard, and quantized as they arrive, so the full-precision model is
never held in memory. The result is an ordinary transformers model whose linear layers are
bitsandbytes' `Linear4bit` / `Linear8bitLt`: peft, transformers' `save_pretrained` and lorakit's
`LoraLinear` all know them."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lorakit.quant.bnb import quiet_bitsandbytes
from lorakit.quant.config import QuantConfig
from lorakit.quant.heap import release_freed_memory
from lorakit.quant.mapped import own_unquantized_tensors


def bnb_config(config: QuantConfig):
    """transformers' `BitsAndBytesConfig` for `config` (which must be enabled)."""
    from transformers import BitsAndBytesConfig  # here: transformers' model classes cost seconds to import

    skip = list(config.skip_modules) if config.skip_modules else None
    if config.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quantization,
        bnb_4bit_use_double_quant=config.uses_double_quant,
        bnb_4bit_compute_dtype=config.torch_compute_dtype,
        llm_int8_skip_modules=skip,
    )


def load_quantized(path: str | os.PathLike, config: QuantConfig, device: str | torch.device = "cpu", **kwargs: Any) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path, quantization_config=...)`; the layers left unquantized
    (embeddings, norms, output head) are held in `config.compute_dtype`."""
    from transformers import AutoModelForCausalLM  # here: seconds of import, only when a model loads

    config.validate(device)
    kwargs.setdefault("dtype", config.torch_compute_dtype)
    kwargs.setdefault("local_files_only", True)
    device_map = {"": str(torch.device(device))}
    with quiet_bitsandbytes():
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=bnb_config(config), device_map=device_map, **kwargs)
    own_unquantized_tensors(model)  # else the checkpoint's whole memory map stays resident
    release_freed_memory()
    return model
