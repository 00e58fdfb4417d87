"""`lorakit export-gguf ADAPTER -o a.gguf`: an adapter in llama.cpp's LoRA GGUF (llama-server --lora, Ollama ADAPTER)."""

from __future__ import annotations

import argparse

from lorakit.commands.merge import base_for
from lorakit.export.gguf_adapter import ADAPTER_TYPES, export_adapter_gguf


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export-gguf", help="write an adapter as a llama.cpp / Ollama LoRA GGUF file")
    parser.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--output", "-o", required=True, help="the .gguf file to write (atomically)")
    parser.add_argument("--base", default=None, help="the base it was trained on: 'default' or a local directory (default: the adapter's base_model_name_or_path if it is a local directory, else 'default'); only its config.json is read")
    parser.add_argument("--dtype", default="f32", choices=list(ADAPTER_TYPES), help="type of the LoRA factors in the file (default f32, exact)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = export_adapter_gguf(args.adapter, args.output, base=base_for(args.adapter, args.base), dtype=args.dtype)
    for line in report.lines():
        print(line)
    return 0
