"""`report_to: tensorboard`: metrics.jsonl's records also written as TensorBoard scalars in output_dir/runs.

Tags follow HF Trainer's (train/loss, train/lr, eval/loss, ...), so dashboards built for Trainer runs read
these too. torch.utils.tensorboard takes ~2 s to import: it is imported only when a run asks for it."""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.train.metrics import MetricsLog

REPORT_TO = ("none", "tensorboard")
RUNS_DIR = "runs"
INSTALL = "pip install tensorboard (or pip install 'lorakit[tensorboard]')"


def report_to_problems(report_to: str) -> list[str]:
    """Config problems of the `report_to` setting (a missing package included, before any model is loaded)."""
    if report_to not in REPORT_TO:
        return [f"report_to must be none or tensorboard (got {report_to!r})"]
    if report_to == "tensorboard" and not tensorboard_installed():
        return [f"report_to: tensorboard needs the tensorboard package; {INSTALL}, or set report_to: none"]
    return []


def tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401  (its top-level module is lazy: ~20 ms)
    except ImportError:
        return False
    return True


def tag(key: str) -> str:
    """A metrics.jsonl key as a TensorBoard tag: eval_loss -> eval/loss, loss -> train/loss."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


class TensorBoardLog:
    """A MetricsLog whose records also go to a SummaryWriter; every number but the step becomes a scalar
    at that step. Flushed after each record (records come every logging_steps, so this costs nothing),
    closed when the log is dropped at the end of the run."""

    def __init__(self, metrics: MetricsLog, log_dir: Path, resume_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LorakitError(f"report_to: tensorboard needs the tensorboard package; {INSTALL}") from None
        self.metrics = metrics
        # purge_step: on resume, TensorBoard hides the old events from the first step written again on, as
        # MetricsLog drops their records (the checkpoint's step itself was done and stays)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=None if resume_step is None else resume_step + 1)
        weakref.finalize(self, self.writer.close)

    def write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag(key), value, step)
        self.writer.flush()


def open_metrics(output_dir: str | Path, report_to: str = "none", resume_step: int | None = None) -> MetricsLog | TensorBoardLog:
    """The run's metrics log: metrics.jsonl, and TensorBoard events in output_dir/runs when asked for."""
    metrics = MetricsLog(output_dir, resume_step=resume_step)
    if report_to == "none":
        return metrics
    if report_to != "tensorboard":
        raise LorakitError(f"report_to must be none or tensorboard (got {report_to!r})")
    return TensorBoardLog(metrics, Path(output_dir) / RUNS_DIR, resume_step)
