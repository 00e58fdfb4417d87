"""`lorakit merge ADAPTER --output DIR`: fold an adapter into its base and write a plain model directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.merge import merge_to_directory


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("merge", help="merge an adapter into its base model and write a transformers model directory")
    parser.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--output", "-o", required=True, help="model directory to write (atomically)")
    parser.add_argument("--model", default=None, help="base model: 'default' or a local directory (default: the adapter's base_model_name_or_path if it is a local directory, else 'default')")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the merged weights (default bf16); a quantized base is dequantized, never silently re-quantized")
    parser.add_argument("--quantization", default=None, help="how the base was quantized in training (default: what training recorded beside the adapter)")
    parser.add_argument("--requantize", default=None, choices=["nf4", "fp4", "int8"], help="write a quantized merged model and report the logit error that introduces")
    parser.set_defaults(run=run)


def base_for(adapter: str, model: str | None) -> str:
    if model:
        return model
    config = Path(adapter) / "adapter_config.json"
    named = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
    return named if named and (Path(named) / "config.json").is_file() else "default"


def run(args: argparse.Namespace) -> int:
    report = merge_to_directory(base_for(args.adapter, args.model), args.adapter, args.output, dtype=args.dtype,
                                quantization=args.quantization, requantize=args.requantize)
    for line in report.lines():
        print(line)
    return 0
