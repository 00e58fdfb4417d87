"""`lorakit <command>`: each command lives in lorakit/commands/<name>.py with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

from lorakit.errors import LorakitError

COMMANDS = ["train", "generate", "merge", "inspect", "estimate"]


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
