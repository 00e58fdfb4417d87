"""What every training run writes around the adapter: the output directory check, the run's config, and
the summary, for causal-LM and classification runs alike (each written atomically). A summary carries
the figures a LoRA run and a full fine-tuning run are weighed by (run_figures), and compare_runs prints
two runs' summaries side by side."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Callable

import yaml

from lorakit.errors import LorakitError
from lorakit.io import atomic_write_text
from lorakit.train.config import RunConfig
from lorakit.train.loop import TrainResult


def check_output_dir(config: RunConfig) -> Path:
    """The output directory, refused (before anything loads) when a file stands there."""
    out = Path(config.train.output_dir)
    if out.exists() and not out.is_dir():
        raise LorakitError(f"output_dir {out} exists and is a file; choose a directory")
    return out


def write_run_config(out: Path, config: RunConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "lorakit_config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def write_summary(out: Path, summary: dict, result: TrainResult, log: Callable[[str], None], compare_with: str = "") -> dict:
    """summary.json, and the closing line saying where everything is; with `compare_with` (another run's
    output_dir), this run's figures beside that run's."""
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    saved = "model" if summary.get("finetune") == "full" else "adapter"
    log(f"{saved} saved to {out / saved} ({result.steps} steps, {result.tokens_per_second:.0f} tokens/s); "
        f"metrics in {out / 'metrics.jsonl'}, loss curve in {out / 'loss.png'}")
    if compare_with:
        log(compare_runs(summary, compare_with))
    return summary


def run_figures(result: TrainResult, saved: Path) -> dict:
    """What runs are weighed by besides quality: seconds in optimizer steps, the process's peak resident
    memory (and peak CUDA memory when a GPU was used), and the size of what was saved."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
    figures: dict = {"train_seconds": round(result.seconds, 1), "peak_rss_mb": round(rss / 2**20)}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if saved.is_dir():
        figures["saved_bytes"] = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    return figures


def compare_runs(mine: dict, other_dir: str | Path) -> str:
    """This run's summary beside another run's: memory, time, size and quality, with their ratio."""
    try:
        other = json.loads((Path(other_dir) / "summary.json").read_text())
    except (OSError, ValueError) as err:
        return f"cannot compare with {other_dir}: its summary.json is unreadable ({type(err).__name__}); rerun that run"

    def figure(summary: dict, key: str) -> float | None:  # quality after training, where the run scored it
        return (summary.get("after") or {}).get(key, summary.get(key))

    rows = [("trainable params", "trainable_parameters", "{:,.0f}"), ("peak RSS (MB)", "peak_rss_mb", "{:,.0f}"),
            ("peak GPU (MB)", "peak_gpu_mb", "{:,.0f}"), ("train time (s)", "train_seconds", "{:,.1f}"),
            ("tokens/s", "tokens_per_second", "{:,.0f}"), ("saved size (MB)", "saved_bytes", "{:,.2f}"),
            ("exact match", "exact_match", "{:.1%}"), ("eval loss", "eval_loss", "{:.4f}")]
    lines = [f"  {'':<17} {'this run (' + mine.get('finetune', 'lora') + ')':>18} {other.get('finetune', 'lora') + ' run':>18} {'ratio':>8}"]
    for label, key, fmt in rows:
        a, b = figure(mine, key), figure(other, key)
        if a is None and b is None:
            continue
        ratio = f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
        shown = [("-" if x is None else fmt.format(x / 2**20 if key == "saved_bytes" else x)) for x in (a, b)]
        lines.append(f"  {label:<17} {shown[0]:>18} {shown[1]:>18} {ratio:>8}")
    return f"compared with {other_dir}:\n" + "\n".join(lines)
