"""Quantized bases (QLoRA): bitsandbytes NF4 / FP4 / int8 loading, training preparation, dequantized
merging and measured re-quantization. bitsandbytes' own storage format is kept throughout."""

from lorakit.quant.config import QUANTIZATIONS, QuantConfig, add_quant_arguments, quant_config_from_args
from lorakit.quant.guard import ensure_4bit_trainable, find_repacked_4bit, keep_4bit_trainable
from lorakit.quant.load import detect_quantization, load_quantized, quantized_layers
from lorakit.quant.merge import MergeReport, merge_quantized, merge_to_directory, read_quant_record, write_quant_record
from lorakit.quant.prepare import prepare_model_for_kbit_training
from lorakit.quant.requantize import dequantize_model, logit_error, requantize_model

__all__ = [
    "QUANTIZATIONS",
    "QuantConfig",
    "add_quant_arguments",
    "quant_config_from_args",
    "ensure_4bit_trainable",
    "find_repacked_4bit",
    "keep_4bit_trainable",
    "detect_quantization",
    "load_quantized",
    "quantized_layers",
    "MergeReport",
    "merge_quantized",
    "merge_to_directory",
    "read_quant_record",
    "write_quant_record",
    "prepare_model_for_kbit_training",
    "dequantize_model",
    "logit_error",
    "requantize_model",
]
