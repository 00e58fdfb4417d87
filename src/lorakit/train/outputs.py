"""What every training run writes around the adapter: the output directory check, the run's config, and
the summary, for causal-LM and classification runs alike (each written atomically)."""

from __future__ import annotations

import json
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


def write_summary(out: Path, summary: dict, result: TrainResult, log: Callable[[str], None]) -> dict:
    """summary.json, and the closing line saying where everything is."""
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(f"adapter saved to {out / 'adapter'} ({result.steps} steps, {result.tokens_per_second:.0f} tokens/s); "
        f"metrics in {out / 'metrics.jsonl'}, loss curve in {out / 'loss.png'}")
    return summary
