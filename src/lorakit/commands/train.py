"""`lorakit train [CONFIG.yaml] [--name value ...]`: train a LoRA adapter; with no arguments, on the
default model and the shipped order->JSON task, ending with a before/after table."""

from __future__ import annotations

import argparse

from lorakit.errors import LorakitError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lorakit.train.config import help_text

    parser = sub.add_parser(
        "train", help="train a LoRA / QLoRA adapter", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a LoRA adapter from a YAML config; any setting can be overridden as --name value "
        "(e.g. lorakit train my.yaml --max_steps 200 --output_dir out/).", epilog=help_text(),
    )
    parser.add_argument("config", nargs="?", help="YAML file with model / lora / data / train sections (or flat keys)")
    parser.set_defaults(run=run)


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """["--max_steps", "200", "--bf16=false"] -> {"max_steps": "200", "bf16": "false"}."""
    overrides, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise LorakitError(f"unexpected argument {token!r}; settings are given as --name value")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise LorakitError(f"--{name} needs a value (e.g. --{name} 10)")
            value, i = tokens[i + 1], i + 1
        overrides[name] = value
        i += 1
    return overrides


def run(args: argparse.Namespace) -> int:
    from lorakit.train.config import load_run_config
    from lorakit.train.run import run_training

    config = load_run_config(args.config, parse_overrides(args.overrides))
    run_training(config)
    return 0
