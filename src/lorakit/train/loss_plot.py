"""Draw loss.png from metrics.jsonl; run as a script (`python loss_plot.py OUTPUT_DIR`) in a child process.

matplotlib adds ~32 MB to the process that imports it; drawn here, that memory is never part of a
training process, whose peak memory users budget for. Standard library and matplotlib only: importing
the lorakit package would load torch and transformers into the child for nothing."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def draw(output_dir: Path) -> int:
    """Write loss.png (atomically: a temporary file renamed over it); 0 when drawn, 1 with nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = output_dir / METRICS_FILE
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return 1
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{PLOT_FILE}.tmp-", suffix=".png", dir=output_dir)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, dpi=100, format="png")
        os.replace(tmp, output_dir / PLOT_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(draw(Path(sys.argv[1])))
