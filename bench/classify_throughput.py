"""Classification training, side by side: lorakit vs peft + transformers' Trainer (fp32 and bf16).

Same data (the shipped sentiment task), same base (all-MiniLM-L6-v2 from its wheel), same LoRA config
(r=8, alpha 16, query/value, the head trained in full), same batch size, learning rate and epochs.
Each configuration runs in its own subprocess, so peak RSS is its own. Reported per configuration:
training examples/s (the training call only: no load, no scoring), peak RSS of the process, and
held-out accuracy after training.

    OMP_NUM_THREADS=2 .venv/bin/python bench/classify_throughput.py               # full: 2000 train, 3 epochs
    OMP_NUM_THREADS=1 .venv/bin/python bench/classify_throughput.py --smoke       # tiny sizes, a minute

The peft side follows its own sequence-classification recipe: the model loaded in fp32,
DataCollatorWithPadding (padded to the longest of each random batch), Trainer with bf16=True for the
bf16 row (autocast on the CPU). lorakit runs its default SEQ_CLS training path (bf16 base, bf16
autocast, length-grouped batches)."""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("peft-fp32", "peft-bf16", "lorakit")
R, ALPHA, TARGETS, LR = 8, 16, ["query", "value"], 1e-3


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def child_peft(args, bf16: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from lorakit.models.classifier import default_encoder_dir
    from lorakit.train.schedule import warmup_steps_for
    from lorakit.tasks.sentiment import LABELS, train_eval_records

    hf_logging.set_verbosity_error()
    folder = str(default_encoder_dir())
    train_raw, eval_raw = train_eval_records(args.train, args.eval)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    label2id = {name: i for i, name in enumerate(LABELS)}

    def encode(rows):
        return [dict(tokenizer(r["text"], truncation=True, max_length=128), labels=label2id[r["label"]]) for r in rows]

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(LABELS), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, per_device_eval_batch_size=64, num_train_epochs=args.epochs,
            learning_rate=LR, warmup_steps=warmup_steps_for(math.ceil(args.train / args.batch * args.epochs), 0, 0.1), lr_scheduler_type="cosine", max_grad_norm=1.0, bf16=bf16, use_cpu=True,
            report_to=[], save_strategy="no", logging_strategy="no", eval_strategy="no", seed=args.seed,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=training, train_dataset=encode(train_raw), data_collator=DataCollatorWithPadding(tokenizer))
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        predictions = trainer.predict(encode(eval_raw))
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    return {"examples_per_second": args.train * args.epochs / seconds, "seconds": seconds, "accuracy": accuracy}


def child_lorakit(args) -> dict:
    from lorakit.infer.classify import score_classifier
    from lorakit.train.classification import SEQ_CLS
    from lorakit.train.classify_run import prepare_run
    from lorakit.train.config import load_run_config
    from lorakit.train.loop import train

    with tempfile.TemporaryDirectory() as out:
        config = load_run_config(None, {
            "task_type": "SEQ_CLS", "r": R, "lora_alpha": ALPHA, "target_modules": ",".join(TARGETS), "learning_rate": LR,
            "per_device_train_batch_size": args.batch, "num_train_epochs": args.epochs, "task_train_examples": args.train,
            "task_eval_examples": args.eval, "output_dir": out, "seed": args.seed, "logging_steps": 10**6})
        run = prepare_run(config, log=lambda *_: None)
        last = [0.0]  # the end of the last optimizer step: the final adapter save and loss plot are not training
        started = time.perf_counter()
        train(run.model, run.train_examples, [], config.train, log=lambda *_: None, objective=SEQ_CLS, batcher=run.batcher,
              on_step=lambda _: last.__setitem__(0, time.perf_counter()))
        seconds = last[0] - started
    score, = score_classifier(run.model, run.eval_examples, run.data.eval, run.data.labels, run.tokenizer.pad_token_id,
                              {"adapter": run.model.active_adapter})
    return {"examples_per_second": args.train * args.epochs / seconds, "seconds": seconds, "accuracy": score.accuracy}


def run_child(args) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    result = child_lorakit(args) if args.child == "lorakit" else child_peft(args, bf16=args.child == "peft-bf16")
    result["peak_rss_gb"] = peak_rss_gb()
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000, help="training examples")
    parser.add_argument("--eval", type=int, default=400, help="held-out examples for accuracy")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; the best examples/s is kept")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (96 train, 64 eval, 1 epoch): checks the bench runs")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    if args.smoke:
        args.train, args.eval, args.epochs = 96, 64, 1
    import torch

    print(f"classification training: {args.train} examples x {args.epochs:g} epochs, batch {args.batch}, r={R} {'/'.join(TARGETS)}, "
          f"lr {LR}; torch threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    results = {}
    for name in args.configs.split(","):
        best = None
        for _ in range(args.repeats):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, __file__, "--child", name, "--result", f.name, "--train", str(args.train), "--eval",
                       str(args.eval), "--epochs", str(args.epochs), "--batch", str(args.batch), "--seed", str(args.seed)]
                subprocess.run(cmd, check=True)
                result = json.loads(Path(f.name).read_text())
            if best is None or result["examples_per_second"] > best["examples_per_second"]:
                best = result
        results[name] = best
        print(f"  {name:<10} {best['examples_per_second']:8.1f} examples/s  {best['peak_rss_gb']:.2f} GB  accuracy {best['accuracy']:.1%}", flush=True)
    print("\n| config | examples/s | peak RSS | held-out accuracy |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['examples_per_second']:.1f} | {r['peak_rss_gb']:.2f} GB | {r['accuracy']:.1%} |")
    peers = [r for n, r in results.items() if n != "lorakit"]
    if "lorakit" in results and peers:
        fastest = max(peers, key=lambda r: r["examples_per_second"])
        ours = results["lorakit"]
        print(f"\nlorakit / best peft: {ours['examples_per_second'] / fastest['examples_per_second']:.2f}x examples/s, "
              f"{ours['peak_rss_gb'] / fastest['peak_rss_gb']:.2f}x peak RSS, accuracy {100 * (ours['accuracy'] - fastest['accuracy']):+.1f} points")


if __name__ == "__main__":
    main()
