"""`lorakit classify --adapter DIR "text" ...`: each text's label and the class probabilities."""

from __future__ import annotations

import argparse
import sys

from lorakit.data.class_batches import tokenize_class
from lorakit.data.classify import ClassRecord
from lorakit.errors import LorakitError
from lorakit.infer.classify import load_classification_adapters, predict_proba


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("classify", help="label texts with a classification (SEQ_CLS) adapter")
    parser.add_argument("texts", nargs="*", help="texts to classify; none: one text per line from stdin")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="a SEQ_CLS adapter directory (peft format)")
    parser.add_argument("--model", default="default", help="'default' (all-MiniLM-L6-v2) or the local base model directory")
    parser.add_argument("--pair", default=None, help="second text of a pair, for every text (adapters trained on text_pair)")
    parser.add_argument("--top", type=int, default=0, help="show only the N most likely labels per text (0: all)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise LorakitError("no text to classify; pass texts as arguments or one per line on stdin")
    if args.top < 0:
        raise LorakitError("--top must be >= 0")
    model, tokenizer, labels = load_classification_adapters({"adapter": args.adapter}, args.model, args.dtype)
    records = [ClassRecord(f"text {i + 1}", t, -1, args.pair) for i, t in enumerate(texts)]
    probs = predict_proba(model, tokenize_class(records, None, tokenizer, args.max_seq_len), tokenizer.pad_token_id,
                          bf16=args.dtype != "float32")
    shown = args.top or labels.num_labels
    for text, row in zip(texts, probs):
        order = row.argsort(descending=True).tolist()[:shown]
        ranked = "  ".join(f"{labels.names[i]} {float(row[i]):.3f}" for i in order)
        print(f"{labels.names[order[0]]}\t{ranked}\t{text}")
    return 0
