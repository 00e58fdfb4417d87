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
    parser.epilog += ("\n\nprocesses:\n    --nproc N                      train on N local processes (torchrun --standalone "
                      "--nproc_per_node N -m lorakit train ...); for several machines run torchrun yourself (README)")
    parser.epilog += ("\n\nfull fine-tuning:\n    --full                         train every weight instead of an adapter (= --finetune "
                      "full); writes output_dir/model; --compare_with OUT_DIR prints it beside a LoRA run")
    parser.set_defaults(run=run)


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """["--max_steps", "200", "--bf16=false", "--full"] -> {"max_steps": "200", "bf16": "false", "finetune": "full"}."""
    overrides, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--full":  # the one flag without a value: --finetune full
            overrides["finetune"], i = "full", i + 1
            continue
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

    from lorakit.train.distributed import launch, leaving_process_group

    overrides = parse_overrides(args.overrides)
    nproc = overrides.pop("nproc", None)
    config = load_run_config(args.config, overrides)  # every problem reported once, before any process starts
    if nproc is not None:  # `--nproc N`: torchrun runs this same command on N local processes
        if not nproc.isdigit() or int(nproc) < 1:
            raise LorakitError(f"--nproc must be a whole number >= 1 (got {nproc!r})")
        if config.train.finetune == "full":
            raise LorakitError("--full runs in one process (its gradients are the whole model); drop --nproc")
        rest = [t for i, t in enumerate(args.overrides) if not _is_nproc(args.overrides, i)]
        return launch(int(nproc), ["train", *([args.config] if args.config else []), *rest])
    with leaving_process_group():
        run_training(config)
    return 0


def _is_nproc(tokens: list[str], i: int) -> bool:
    """tokens[i] is `--nproc`, `--nproc=N`, or the value after `--nproc`."""
    token = tokens[i]
    return token == "--nproc" or token.startswith("--nproc=") or (i > 0 and tokens[i - 1] == "--nproc")
