"""`lorakit inspect [MODEL]`: the linear layers and the trainable-parameter report for a LoRA config."""

from __future__ import annotations

import argparse

import torch

from lorakit.config import LoraConfig
from lorakit.lora.layer import LoraLinear
from lorakit.lora.model import get_peft_model
from lorakit.lora.targets import is_linear_like
from lorakit.models.load import load_model, load_tokenizer


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("inspect", help="list linear layers and the trainable-parameter report for a config")
    parser.add_argument("model", nargs="?", default="default", help="'default' or a local model directory")
    add_lora_arguments(parser)
    parser.add_argument("--forward", action="store_true", help="also run one forward pass with the fresh adapter")
    parser.set_defaults(run=run)


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (default 32)")
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                        help="module names / dotted suffixes, 'all-linear', or one regex (default q,k,v,o)")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--bias", default="none", help="none | all | lora_only")
    parser.add_argument("--use-rslora", action="store_true")


def lora_config_from_args(args: argparse.Namespace) -> LoraConfig:
    targets = args.target_modules
    if len(targets) == 1 and (targets[0] == "all-linear" or any(c in targets[0] for c in "*^$[]()|\\")):
        targets = targets[0]
    return LoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=targets, lora_dropout=args.lora_dropout,
                      bias=args.bias, use_rslora=args.use_rslora, task_type="CAUSAL_LM")


def run(args: argparse.Namespace) -> int:
    config = lora_config_from_args(args)
    model = load_model(args.model, dtype=torch.float32)
    shapes: dict[tuple[str, tuple], int] = {}
    for name, module in model.named_modules():
        if is_linear_like(module):
            key = (name.rsplit(".", 1)[-1], tuple(module.weight.shape))
            shapes[key] = shapes.get(key, 0) + 1
    wrapped = get_peft_model(model, config)
    adapted = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, LoraLinear)}
    print(f"{type(model).__name__}: linear layers (* = adapted)")
    for (leaf, shape), count in shapes.items():
        print(f"  {'*' if leaf in adapted else ' '} {leaf:<16} weight {str(list(shape)):<14} x{count}")
    wrapped.print_trainable_parameters()
    if args.forward:
        tokenizer = load_tokenizer(args.model)
        batch = tokenizer(["LoRA adapts a frozen model with a low-rank update."], return_tensors="pt")
        with torch.no_grad():
            adapted = wrapped(**batch).logits
            with wrapped.disable_adapter():
                base = wrapped(**batch).logits
        print(f"forward pass: logits {list(adapted.shape)}, max |adapted - base| = {(adapted - base).abs().max().item():.3g} (a fresh adapter changes nothing)")
    return 0


