"""`lorakit generate`: complete a prompt or answer a chat message, with or without adapters, streamed."""

from __future__ import annotations

import argparse
import sys

from lorakit.commands.specs import MIXED, AdapterSpec, parse_adapter_specs
from lorakit.infer.engine import Engine
from lorakit.infer.sampling import SamplingParams
from lorakit.lora.model import LoraModel
from lorakit.models.load import load_model, load_tokenizer


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("generate", help="generate text from the base model or base + adapter(s)")
    parser.add_argument("--model", default="default", help="'default' or a local model directory")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR[:SCALE]",
                        help="adapter directory (peft format); repeat to mix several, each with an optional scale")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="raw text to continue")
    what.add_argument("--chat", help="a user message, rendered with the tokenizer's chat template")
    parser.add_argument("--system", default=None, help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    parser.set_defaults(run=run)


def model_with_adapters(model_name: str, dtype: str, specs: list[AdapterSpec]) -> LoraModel:
    """The base model with each (name, directory, _) adapter loaded, for inference."""
    model = LoraModel.wrap(load_model(model_name, dtype=dtype))
    for name, directory, _ in specs:
        model.load_adapter(directory, name)
    return model


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop=tuple(args.stop), seed=args.seed).validate()
    specs = parse_adapter_specs(args.adapter, MIXED)
    tokenizer = load_tokenizer(args.model)
    model = model_with_adapters(args.model, args.dtype, specs)
    engine = Engine.from_model(model, tokenizer, max_batch=1, max_len=4096)
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.chat}]
        prompt = engine.chat_prompt(messages)
    else:
        prompt = tokenizer.encode(args.prompt, add_special_tokens=True)
    mix = {name: scale for name, _, scale in specs} or None
    try:
        for piece in engine.submit(prompt, mix, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        engine.close(cancel=True)
    sys.stdout.write("\n")
    return 0
