"""`lorakit eval`: exact match of adapters (and the base) on held-out records, by greedy generation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.commands.generate import parse_adapter_spec
from lorakit.data.records import load_records
from lorakit.errors import LorakitError
from lorakit.infer.scoring import score_samples
from lorakit.io import atomic_write_text
from lorakit.lora.model import LoraModel
from lorakit.lora.routing import BASE
from lorakit.models.load import load_model, load_tokenizer


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="score adapters (and the base) on held-out records: exact match")
    parser.add_argument("adapters", nargs="*", metavar="[NAME=]DIR", help="adapter directories (peft format)")
    parser.add_argument("--data", required=True, help="records in any format lorakit trains on (.jsonl, .json, .csv, ...)")
    parser.add_argument("--base", action="store_true", help="score the base model too (always, when no adapter is given)")
    parser.add_argument("--model", default="default", help="'default' or a local model directory")
    parser.add_argument("--template", default="auto", help="prompt template, as in training (auto, alpaca, chatml)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N records")
    parser.add_argument("--predictions", default=None, help="write every prediction to this JSONL file")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise LorakitError("--max-new-tokens must be >= 1")
    specs = [parse_adapter_spec(s, i) for i, s in enumerate(args.adapters)]
    samples = list(load_records(args.data).samples)[: args.limit]
    tokenizer = load_tokenizer(args.model)
    model = LoraModel.wrap(load_model(args.model, dtype=args.dtype))
    for name, directory, _ in specs:
        model.load_adapter(directory, name)
    wanted = ({"base": BASE} if args.base or not specs else {}) | {name: name for name, _, _ in specs}
    scores = score_samples(model, tokenizer, samples, wanted, args.template, args.max_new_tokens)
    print(f"{'model':<24} {'exact match':>12}  records")
    for score in scores:
        print(f"{score.label:<24} {100 * score.exact_match:>11.1f}%  {len(score.predictions)}")
    if args.predictions:
        lines = [json.dumps({"model": s.label, **p}) + "\n" for s in scores for p in s.predictions]
        atomic_write_text(Path(args.predictions), "".join(lines))
        print(f"predictions: {args.predictions}")
    return 0
