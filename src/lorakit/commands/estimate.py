"""`lorakit estimate [MODEL]`: full fine-tuning vs LoRA vs QLoRA memory, from config.json alone."""

from __future__ import annotations

import argparse

from lorakit.errors import LorakitError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "estimate",
        help="memory of full fine-tuning vs LoRA vs QLoRA for a model, from its config.json (no weights read)",
        description="Trainable parameters, weight memory (fp32 / bf16 / int8 / nf4+double-quant), gradients, optimizer "
        "state, activations for the batch and the saved size, for full fine-tuning, LoRA and QLoRA side by side.",
    )
    parser.add_argument("model", nargs="?", default="default", help="'default', a model directory, or a config.json file")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                        help="module names / dotted suffixes, 'all-linear', or one regex (default q,k,v,o)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    parser.add_argument("--batch", type=int, default=4, help="rows per step (default 4)")
    parser.add_argument("--adapter-dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the adapter weights (default fp32)")
    parser.add_argument("--lora-checkpointing", action="store_true", help="assume activation checkpointing for LoRA too")
    parser.add_argument("--no-qlora-checkpointing", action="store_true", help="assume QLoRA runs without activation checkpointing")
    parser.add_argument("--allocator", default="glibc", choices=["glibc", "mmap"],
                        help="glibc: the CPU allocator as lorakit train leaves it (keeps freed activations resident); "
                             "mmap: with a fixed 1 MB mmap threshold (bench/malloc.py)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: lorakit.estimate pulls in transformers' modelling code (~2 s), which every
    # other command and `lorakit --help` would pay, since cli.py imports all command modules
    from lorakit.estimate import estimate

    problems = [f"--{name} must be a positive integer (got {getattr(args, name.replace('-', '_'))})"
                for name in ("r", "seq-len", "batch") if getattr(args, name.replace("-", "_")) <= 0]
    if problems:
        raise LorakitError("; ".join(problems))
    targets = args.target_modules
    if len(targets) == 1 and (targets[0] == "all-linear" or any(c in targets[0] for c in "*^$[]()|\\")):
        targets = targets[0]
    result = estimate(args.model, r=args.r, target_modules=targets, seq_len=args.seq_len, batch=args.batch,
                      adapter_bytes=4 if args.adapter_dtype == "fp32" else 2, lora_checkpointing=args.lora_checkpointing,
                      qlora_checkpointing=not args.no_qlora_checkpointing, allocator=args.allocator)
    print(result.table())
    return 0
