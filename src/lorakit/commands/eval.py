"""`lorakit eval`: exact match of adapters (and the base) on held-out records, by greedy generation;
accuracy and macro-F1 for classification (SEQ_CLS) adapters, whose adapter_config.json says so."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.commands.generate import model_with_adapters
from lorakit.commands.specs import MIXED, parse_adapter_specs
from lorakit.data.records import load_records
from lorakit.errors import LorakitError
from lorakit.infer.classify import is_classification_adapter, load_classification_adapters, score_classifier
from lorakit.infer.scoring import score_samples
from lorakit.io import atomic_write_text
from lorakit.lora.routing import BASE
from lorakit.models.load import load_tokenizer


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="score adapters (and the base) on held-out records: exact match, or accuracy / macro-F1 for classifiers")
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
    specs = parse_adapter_specs(args.adapters, MIXED, label="adapter")
    kinds = {name: is_classification_adapter(directory) for name, directory, _ in specs}
    if any(kinds.values()):
        if not all(kinds.values()):
            raise LorakitError(f"{', '.join(n for n, c in kinds.items() if not c)} generate(s) text but "
                               f"{', '.join(n for n, c in kinds.items() if c)} classif(y/ies); evaluate them separately")
        return run_classification(args, {name: directory for name, directory, _ in specs})
    samples = list(load_records(args.data).samples)[: args.limit]
    tokenizer = load_tokenizer(args.model)
    model = model_with_adapters(args.model, args.dtype, specs)
    wanted = ({"base": BASE} if args.base or not specs else {}) | {name: name for name, _, _ in specs}
    scores = score_samples(model, tokenizer, samples, wanted, args.template, args.max_new_tokens)
    print(f"{'model':<24} {'exact match':>12}  records")
    for score in scores:
        print(f"{score.label:<24} {100 * score.exact_match:>11.1f}%  {len(score.predictions)}")
    write_predictions(args.predictions, scores)
    return 0


def run_classification(args: argparse.Namespace, adapters: dict[str, str]) -> int:
    """Accuracy and macro-F1 of SEQ_CLS adapters (and with --base, the base's untrained head) on labelled records."""
    from lorakit.data.class_batches import tokenize_class
    from lorakit.data.classify import load_class_records

    records = load_class_records(args.data).records[: args.limit]
    model, tokenizer, labels = load_classification_adapters(adapters, args.model, args.dtype)
    examples = tokenize_class(records, labels.encode(records, args.data), tokenizer, 512)
    wanted = ({"base": BASE} if args.base else {}) | {name: name for name in adapters}
    scores = score_classifier(model, examples, records, labels, tokenizer.pad_token_id, wanted, bf16=args.dtype != "float32")
    print(f"{'model':<24} {'accuracy':>9} {'macro-F1':>9}  records")
    for score in scores:
        print(f"{score.label:<24} {100 * score.accuracy:>8.1f}% {score.macro_f1:>9.3f}  {len(score.predictions)}")
    write_predictions(args.predictions, scores)
    return 0


def write_predictions(path: str | None, scores) -> None:
    """Every prediction of every scored model as one JSONL file (atomic), when a path is given."""
    if path:
        lines = [json.dumps({"model": s.label, **p}) + "\n" for s in scores for p in s.predictions]
        atomic_write_text(Path(path), "".join(lines))
        print(f"predictions: {path}")
