"""The training loop: AdamW on the adapter, gradient accumulation, warm-up + cosine, clipping,
eval loss, metrics, checkpoints that resume exactly, Ctrl-C saves and exits cleanly."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from lorakit.data import PackedRow, batches
from lorakit.train.checkpoint import Progress, checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from lorakit.train.config import TrainSection
from lorakit.train.metrics import MetricsLog, plot_losses
from lorakit.train.optim import build_optimizer
from lorakit.train.schedule import lr_at, warmup_steps_for
from lorakit.train.step import batch_loss_sum, evaluate_loss, training_paths, transformers_model, useful_tokens


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    eval_loss: float | None
    tokens_per_second: float
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)


@dataclass
class _Window:
    """Losses and throughput since the last log line."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.loss, self.steps, self.tokens, self.seconds = self.loss + loss, self.steps + 1, self.tokens + tokens, self.seconds + seconds

    def flush(self) -> dict[str, float]:
        record = {"loss": self.loss / max(self.steps, 1), "tokens_per_second": self.tokens / max(self.seconds, 1e-9)}
        self.loss, self.steps, self.tokens, self.seconds = 0.0, 0, 0, 0.0
        return record


def total_steps(n_rows: int, cfg: TrainSection) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(n_rows / cfg.per_device_train_batch_size)
    return max(1, math.ceil(per_epoch * cfg.num_train_epochs / cfg.gradient_accumulation_steps))


def micro_batches(rows: Sequence[PackedRow], cfg: TrainSection, progress: Progress) -> Iterator[tuple[dict, int, int]]:
    """Endless micro-batches from the saved position on: (batch, epoch, index of the next batch)."""
    epoch, start = progress.epoch, progress.batch_in_epoch
    while True:
        epoch_batches = batches(rows, cfg.per_device_train_batch_size, seed=cfg.seed, epoch=epoch, start=start)
        for index, batch in enumerate(epoch_batches, start=start + 1):
            yield batch, epoch, index
        epoch, start = epoch + 1, 0


def train(
    model,
    train_rows: Sequence[PackedRow],
    eval_rows: Sequence[PackedRow],
    cfg: TrainSection,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the active adapter of `model` (a LoraModel) on packed rows; the adapter ends up in
    `cfg.output_dir/adapter`."""
    output_dir = Path(cfg.output_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps = total_steps(len(train_rows), cfg)
    warmup = warmup_steps_for(steps, cfg.warmup_steps, cfg.warmup_ratio)

    progress = Progress()
    resume = _resume_path(cfg)
    if resume is not None:
        progress, _ = load_checkpoint(resume, model, optimizer)
        log(f"resumed from {resume} at step {progress.step}")
    else:
        torch.manual_seed(cfg.seed)
    metrics = MetricsLog(output_dir, resume_step=progress.step if resume else None)
    hf_model = transformers_model(model)
    if cfg.gradient_checkpointing:
        from lorakit.quant.prepare import enable_checkpointing

        enable_checkpointing(hf_model)
    model.train()
    # Held for the whole run, not just each forward: checkpointed layers recompute during backward
    # and must take the same attention and kernel paths as the first time.
    run = _Run(model, optimizer, params, cfg, progress, steps, warmup, metrics, log)
    with training_paths(hf_model):
        return _run_steps(run, train_rows, eval_rows)


@dataclass
class _Run:
    """What one training run carries from step to step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    cfg: TrainSection
    progress: Progress
    steps: int
    warmup: int
    metrics: MetricsLog
    log: Callable[[str], None]


def _run_steps(run: _Run, train_rows: Sequence[PackedRow], eval_rows: Sequence[PackedRow]) -> TrainResult:
    model, optimizer, params, cfg, progress, steps, metrics = run.model, run.optimizer, run.params, run.cfg, run.progress, run.steps, run.metrics
    output_dir = Path(cfg.output_dir)

    stream = micro_batches(train_rows, cfg, progress)
    bar = tqdm(total=steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True)
    window = _Window()
    losses: list[float] = []
    eval_loss, interrupted = None, False
    run_tokens, run_time = 0, 0.0
    try:
        while progress.step < steps:
            started = time.perf_counter()
            lr = lr_at(progress.step, cfg.learning_rate, steps, run.warmup, cfg.lr_scheduler_type)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, step_tokens = _optimizer_step(model, optimizer, params, stream, cfg, progress)
            elapsed = time.perf_counter() - started
            progress.step += 1
            progress.tokens_seen += step_tokens
            losses.append(step_loss)
            window.add(step_loss, step_tokens, elapsed)
            run_tokens, run_time = run_tokens + step_tokens, run_time + elapsed
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{step_tokens / elapsed:.0f}")
            if progress.step % max(cfg.logging_steps, 1) == 0 or progress.step == steps:
                metrics.write({"step": progress.step, "lr": lr, "tokens_seen": progress.tokens_seen, **window.flush()})
            if eval_rows and cfg.eval_steps and progress.step % cfg.eval_steps == 0 and progress.step < steps:
                eval_loss = _evaluate(model, eval_rows, cfg, metrics, progress.step)
            if cfg.save_steps and progress.step % cfg.save_steps == 0 and progress.step < steps:
                save_checkpoint(checkpoint_dir(output_dir, progress.step), model, optimizer, progress, {"total_steps": steps})
    except KeyboardInterrupt:
        interrupted = True
        bar.close()
        path = save_checkpoint(checkpoint_dir(output_dir, progress.step), model, optimizer, progress, {"total_steps": steps})
        run.log(f"interrupted: checkpoint at {path}; continue with --resume_from_checkpoint latest")
    bar.close()
    if not interrupted:
        if eval_rows:
            eval_loss = _evaluate(model, eval_rows, cfg, metrics, progress.step)
        model.save_pretrained(output_dir / "adapter")
        plot_losses(output_dir)
    return TrainResult(progress.step, losses[-1] if losses else None, eval_loss, run_tokens / run_time if run_time else 0.0, interrupted, losses)


def _optimizer_step(model, optimizer, params, stream, cfg: TrainSection, progress: Progress) -> tuple[float, int]:
    """Accumulate gradients over the step's micro-batches, normalised by the step's labelled-token
    count (so accumulation gives the same update as one big batch), clip, and step."""
    group = []
    for _ in range(cfg.gradient_accumulation_steps):
        batch, progress.epoch, progress.batch_in_epoch = next(stream)
        group.append(batch)
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
    total = 0.0
    for batch in group:
        loss_sum, _ = batch_loss_sum(model, batch, cfg.bf16)
        (loss_sum / max(labelled, 1)).backward()
        total += float(loss_sum.detach())
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / max(labelled, 1), sum(useful_tokens(b) for b in group)


def _evaluate(model, eval_rows, cfg: TrainSection, metrics: MetricsLog, step: int) -> float:
    from lorakit.quant.guard import ensure_4bit_trainable

    loss = evaluate_loss(model, batches(eval_rows, cfg.per_device_eval_batch_size, shuffle=False), cfg.bf16)
    # bitsandbytes may repack a 4-bit weight in an eval pass, after which backward drops input
    # gradients; undo that before training goes on (a no-op for unquantized bases).
    ensure_4bit_trainable(transformers_model(model))
    metrics.write({"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))})
    return loss


def _resume_path(cfg: TrainSection) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = latest_checkpoint(cfg.output_dir)
        if found is None:
            from lorakit.errors import LorakitError

            raise LorakitError(f"no checkpoint under {cfg.output_dir}/checkpoints to resume from; drop --resume_from_checkpoint")
        return found
    return Path(cfg.resume_from_checkpoint)
