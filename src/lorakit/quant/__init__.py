"""Quantized bases (QLoRA): bitsandbytes NF4 / FP4 / int8 loading, training preparation and measured
re-quantization. bitsandbytes' own storage format is kept throughout.

  config.py      QuantConfig: the base's storage and its validation
  bnb.py         importing bitsandbytes quietly
  load.py        load a base through transformers' BitsAndBytesConfig
  mapped.py      copy unquantized tensors out of the checkpoint's memory map
  heap.py        hand freed heap pages back to the OS after a load
  detect.py      recognise quantized layers and the QuantConfig of a loaded model
  guard.py       keep 4-bit layers differentiable on the CPU
  prepare.py     prepare_model_for_kbit_training
  requantize.py  dequantize / re-quantize a whole model and measure the logit error
  record.py      the quantization record written beside an adapter

Weight kinds and exact dequantization live one floor down, in lorakit.weights (lora/ needs them too).

The names below are imported on first use (PEP 562), not here, so `import lorakit.quant.config` stays
cheap (prepare.py brings in the whole LoRA core for unwrap_model)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "QUANTIZATIONS": "config", "QuantConfig": "config",
    "ensure_4bit_trainable": "guard", "find_repacked_4bit": "guard", "keep_4bit_trainable": "guard",
    "detect_quantization": "detect", "quantized_layers": "detect",
    "load_quantized": "load",
    "read_quant_record": "record", "write_quant_record": "record",
    "prepare_model_for_kbit_training": "prepare",
    "dequantize_model": "requantize", "logit_error": "requantize", "requantize_model": "requantize",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorakit.quant' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lorakit.quant.{_EXPORTS[name]}"), name)
