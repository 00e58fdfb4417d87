"""Training metrics: one JSON object per line, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.io import atomic_write_text
from lorakit.train import loss_plot
from lorakit.train.loss_plot import METRICS_FILE, PLOT_FILE


class MetricsLog:
    """Appends records to `metrics.jsonl`; on resume, drops the records after the checkpoint's step."""

    def __init__(self, output_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(output_dir: str | Path) -> Path | None:
    """Train and eval loss against the step, as loss.png beside metrics.jsonl (None: nothing to draw).
    Drawn by train/loss_plot.py in a child process, so matplotlib never enters a training process."""
    done = subprocess.run([sys.executable, loss_plot.__file__, str(output_dir)], capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise LorakitError(f"drawing {Path(output_dir) / PLOT_FILE} failed: {done.stderr.strip().splitlines()[-1:]}")
    return Path(output_dir) / PLOT_FILE if done.returncode == 0 else None
