"""Quantized bases (QLoRA): bitsandbytes NF4 / FP4 / int8 loading, training preparation, dequantized
merging and measured re-quantization. bitsandbytes' own storage format is kept throughout."""

from lorakit.quant.config import QUANTIZATIONS, QuantConfig, add_quant_arguments, quant_config_from_args
from lorakit.quant.guard import ensure_4bit_trainable, find_repacked_4bit, keep_4bit_trainable
from lorakit.quant.prepare import prepare_model_for_kbit_training

__all__ = [
    "QUANTIZATIONS",
    "QuantConfig",
    "add_quant_arguments",
    "quant_config_from_args",
    "ensure_4bit_trainable",
    "find_repacked_4bit",
    "keep_4bit_trainable",
    "prepare_model_for_kbit_training",
]
