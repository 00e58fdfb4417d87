"""`lorakit <command>`: each command lives in lorakit/commands/<name>.py with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

from lorakit.errors import LorakitError

COMMANDS = ["train", "generate", "eval", "classify", "serve", "merge", "combine", "inspect", "estimate", "export_gguf"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA / QLoRA fine-tuning with peft-compatible adapters.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lorakit.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"lorakit.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """`lorakit train [CONFIG] --name value ...`: the --name value pairs are settings, not flags."""
    if not argv or argv[0] != "train":
        return argv, []
    head, rest = argv[:1], argv[1:]
    if rest and not rest[0].startswith("-"):
        head.append(rest.pop(0))
    if any(t in ("-h", "--help") for t in rest):
        head.append("--help")
    return head, rest


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    args.overrides = overrides
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except LorakitError as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
