"""`lorakit merge ADAPTER --output DIR`: fold an adapter into its base and write a plain model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.export.gguf_model import MODEL_TYPES
from lorakit.export.merged import merge_to_gguf
from lorakit.lora.peft_format import read_adapter_config
from lorakit.merge import merge_to_directory


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("merge", help="merge an adapter into its base model and write a transformers model directory")
    parser.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--output", "-o", required=True, help="model directory to write (atomically)")
    parser.add_argument("--model", default=None, help="base model: 'default' or a local directory (default: the adapter's base_model_name_or_path if it is a local directory, else 'default')")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the merged weights (default bf16); a quantized base is dequantized, never silently re-quantized")
    parser.add_argument("--quantization", default=None, help="how the base was quantized in training (default: what training recorded beside the adapter)")
    parser.add_argument("--requantize", default=None, choices=["nf4", "fp4", "int8"], help="write a quantized merged model and report the logit error that introduces")
    parser.add_argument("--gguf", default=None, choices=list(MODEL_TYPES), help="write one GGUF file for llama.cpp / Ollama at --output instead of a directory, its weights in this type (Llama-family bases)")
    parser.set_defaults(run=run)


def base_for(adapter: str, model: str | None) -> str:
    """The base to merge into: --model, else the adapter's recorded base where it is a local model
    directory, else the default model. A damaged adapter_config.json is a one-line error (peft_format)."""
    if model:
        return model
    named = read_adapter_config(adapter).base_model_name_or_path
    return named if named and (Path(named) / "config.json").is_file() else "default"


def run(args: argparse.Namespace) -> int:
    if args.gguf is not None:
        if args.requantize is not None:
            raise LorakitError("--gguf and --requantize both choose how the merged weights are stored; give one of them")
        report = merge_to_gguf(base_for(args.adapter, args.model), args.adapter, args.output, args.gguf, args.quantization)
    else:
        report = merge_to_directory(base_for(args.adapter, args.model), args.adapter, args.output, dtype=args.dtype,
                                    quantization=args.quantization, requantize=args.requantize)
    for line in report.lines():
        print(line)
    return 0
