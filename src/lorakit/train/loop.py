"""The training loop: AdamW on the adapter, gradient accumulation, warm-up + cosine, clipping,
eval loss, metrics, checkpoints that resume exactly, Ctrl-C saves and exits cleanly.

One optimizer step, as the loop below runs it:

    lr = lr_at(step)                                   # pure function of the step
    group = next k micro-batches                       # k = gradient_accumulation_steps
    n = labels in the group (all processes: global_label_count)
    for batch in group: train_step(batch, normaliser=n)    # backward of loss_sum / n
    clip, optimizer.step(), zero_grad
    progress moves past the group                      # only now: a Ctrl-C mid-step resumes at its start
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from lorakit.data import PackedRow, batches
from lorakit.errors import LorakitError
from lorakit.quant.guard import ensure_4bit_trainable
from lorakit.quant.prepare import enable_checkpointing
from lorakit.train.checkpoint import Progress, checkpoint_dir, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from lorakit.train.config import TrainSection
from lorakit.train.distributed import SINGLE_PROCESS, Replicas, plan_layout, resume_layout
from lorakit.train.metrics import MetricsLog, plot_losses
from lorakit.train.tensorboard import open_metrics
from lorakit.lora.conversion import CONVERTIBLE
from lorakit.train.optim import build_optimizer, loraplus_groups
from lorakit.train.schedule import lr_at, warmup_steps_for
from lorakit.lora.model import unwrap_model
from lorakit.train.step import CAUSAL_LM, Objective, checkpoint_kwargs, evaluate_loss, train_step, training_paths, useful_tokens


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    eval_loss: float | None
    tokens_per_second: float
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # spent in this run's optimizer steps (eval and checkpoints excluded)


@dataclass
class TrainState:
    """What the loop carries from step to step; `progress` is the part a checkpoint saves."""

    progress: Progress
    total_steps: int
    warmup_steps: int
    resumed_from: Path | None = None
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this run
    eval_loss: float | None = None
    tokens: int = 0  # trained in this run, for tokens/s
    seconds: float = 0.0


class Batcher(Protocol):
    """An epoch's batches of `rows` from batch index `start`, the same for the same (seed, epoch)."""

    def __call__(self, rows: Sequence, batch_size: int, seed: int = 0, epoch: int = 0, start: int = 0, shuffle: bool = True) -> Iterator[dict]: ...


class MicroBatch(NamedTuple):
    batch: dict
    epoch: int
    next_index: int  # index in the epoch of the micro-batch after this one


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


def micro_batches(rows: Sequence, cfg: TrainSection, progress: Progress, batcher: Batcher = batches) -> Iterator[MicroBatch]:
    """Endless micro-batches from the saved position on."""
    epoch, start = progress.epoch, progress.batch_in_epoch
    while True:
        epoch_batches = batcher(rows, cfg.per_device_train_batch_size, seed=cfg.seed, epoch=epoch, start=start)
        for index, batch in enumerate(epoch_batches, start=start + 1):
            yield MicroBatch(batch, epoch, index)
        epoch, start = epoch + 1, 0


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    group: Sequence[MicroBatch],
    cfg: TrainSection,
    objective: Objective = CAUSAL_LM,
    global_label_count: Callable[[int], int] = int,
    replicas: Replicas = SINGLE_PROCESS,
) -> float:
    """Accumulate gradients over the group's micro-batches, each normalised by the label count of the
    whole step (so accumulation gives the same update as one big batch), clip, step. Returns the step's
    mean loss. `global_label_count` turns this process's count into the step's normaliser (data-parallel
    training passes an all-reduce over the processes); `replicas` then sums the gradients over them, once,
    after the last micro-batch (no communication on the inner ones)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    normaliser = max(global_label_count(sum(objective.label_count(m.batch) for m in group)), 1)
    total = 0.0
    for m in group:
        total += float(train_step(model, m.batch, normaliser, objective, cfg.bf16).loss_sum)
    total = replicas.reduce_gradients(params, total)  # the step's sync point under data parallelism
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / normaliser


def train(
    model,
    train_rows: Sequence[PackedRow],
    eval_rows: Sequence[PackedRow],
    cfg: TrainSection,
    log: Callable[[str], None] = print,
    *,
    objective: Objective = CAUSAL_LM,
    global_label_count: Callable[[int], int] | None = None,
    on_step: Callable[[TrainState], None] | None = None,
    batcher: Batcher = batches,
    replicas: Replicas = SINGLE_PROCESS,
    save_final: bool = True,
) -> TrainResult:
    """Train the active adapter of `model` (a LoraModel) on packed rows; the adapter ends up in
    `cfg.output_dir/adapter`. `on_step(state)` runs after every optimizer step (a KeyboardInterrupt raised
    there stops the run as Ctrl-C does: a checkpoint of that step, no final adapter). `batcher` turns the
    rows into an epoch's batches (default: packed rows; classification passes length-grouped padded batches).
    `save_final=False` leaves the final save to the caller (full fine-tuning writes a model directory).

    Under data parallelism (`replicas`, see train/distributed.py) every rank calls this with the same rows:
    the stream is of global micro-batches (world_size x per_device_train_batch_size rows), each rank trains
    on its shard, the normaliser defaults to the all-reduced label count, and only rank 0 logs and writes."""
    output_dir = Path(cfg.output_dir)
    main = replicas.is_main
    log = log if main else _quiet
    count_labels = global_label_count or replicas.global_label_count
    params = [p for p in model.parameters() if p.requires_grad]
    groups = loraplus_groups(model, cfg.loraplus_lr_ratio, cfg.weight_decay) if cfg.loraplus_lr_ratio else params
    optimizer = build_optimizer(groups, cfg.optim, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    layout = plan_layout(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.global_batch_size, replicas.world_size)
    progress, resumed_from = Progress(), _resume_path(cfg)
    if resumed_from is not None:
        progress, saved = load_checkpoint(resumed_from, model, optimizer)
        layout, progress.batch_in_epoch = resume_layout(saved, layout, progress.batch_in_epoch, log)
        log(f"resumed from {resumed_from} at step {progress.step}")
    else:
        torch.manual_seed(cfg.seed)
    replicas.broadcast_parameters(params)
    initial = _initial_adapter(model, output_dir, resumed_from, log) if main else None
    cfg = replace(cfg, gradient_accumulation_steps=layout.accumulation)
    data_cfg = replace(cfg, per_device_train_batch_size=layout.micro_batch_rows)  # global micro-batches
    steps = total_steps(len(train_rows), data_cfg)
    state = TrainState(progress, steps, warmup_steps_for(steps, cfg.warmup_steps, cfg.warmup_ratio), resumed_from)
    metrics = open_metrics(output_dir, cfg.report_to, progress.step if resumed_from else None) if main else _NoMetrics()
    hf_model = unwrap_model(model)
    if cfg.gradient_checkpointing or any(getattr(m, "gradient_checkpointing", False) is True for m in hf_model.modules()):
        enable_checkpointing(hf_model, checkpoint_kwargs(hf_model, objective.packed_rows))
    model.train()

    def save() -> Path:
        path = checkpoint_dir(output_dir, state.progress.step)
        if main:  # the adapter and optimizer state are the same on every rank
            save_checkpoint(path, model, optimizer, state.progress, {"total_steps": steps, **layout.record()})
            prune_checkpoints(output_dir, cfg.save_total_limit, protect=state.resumed_from)
        return path

    stream = micro_batches(train_rows, data_cfg, state.progress, batcher)
    bar = tqdm(total=steps, initial=state.progress.step, desc="train", unit="step", dynamic_ncols=True, disable=not main)
    window, interrupted = _Window(), False
    step_rng: torch.Tensor | None = None  # RNG state at the start of a step in progress (dropout draws from it)
    # Held for the whole run, not just each forward: checkpointed layers recompute during backward
    # and must take the same attention and kernel paths as the first time.
    with training_paths(hf_model, packed=objective.packed_rows):
        try:
            while (step := state.progress.step) < steps:
                started, step_rng = time.perf_counter(), torch.get_rng_state()
                lr = lr_at(step, cfg.learning_rate, steps, state.warmup_steps, cfg.lr_scheduler_type)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr * param_group.get("lr_scale", 1.0)  # LoRA+'s B groups: lr x ratio
                group = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
                shards = [m._replace(batch=replicas.shard(m.batch)) for m in group]
                loss = optimizer_step(model, optimizer, shards, cfg, objective, count_labels, replicas)
                tokens, elapsed = sum(useful_tokens(m.batch) for m in group), time.perf_counter() - started

                # the step is done: the data position moves past its micro-batches
                progress = state.progress
                progress.step, progress.epoch, progress.batch_in_epoch = step + 1, group[-1].epoch, group[-1].next_index
                progress.tokens_seen += tokens
                step_rng = None
                state.losses.append(loss)
                state.tokens, state.seconds = state.tokens + tokens, state.seconds + elapsed
                window.add(loss, tokens, elapsed)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / elapsed:.0f}")

                if progress.step % max(cfg.logging_steps, 1) == 0 or progress.step == steps:
                    metrics.write({"step": progress.step, "lr": lr, "tokens_seen": progress.tokens_seen, **window.flush()})
                if eval_rows and cfg.eval_steps and progress.step % cfg.eval_steps == 0 and progress.step < steps:
                    state.eval_loss = _evaluate(model, eval_rows, cfg, metrics, progress.step, objective, batcher, replicas)
                if cfg.save_steps and progress.step % cfg.save_steps == 0 and progress.step < steps:
                    save()
                if on_step is not None:
                    on_step(state)
        except KeyboardInterrupt:
            interrupted = True
            if step_rng is not None:  # stopped inside a step: save the state it started from, to run it again
                torch.set_rng_state(step_rng)
            bar.close()
            log(f"interrupted: checkpoint at {save()}; continue with --resume_from_checkpoint latest")
    bar.close()
    if not interrupted:
        if eval_rows:
            state.eval_loss = _evaluate(model, eval_rows, cfg, metrics, state.progress.step, objective, batcher, replicas)
        if main:
            if save_final:
                model.save_pretrained(output_dir / "adapter", path_initial_model_for_weight_conversion=initial)
            plot_losses(output_dir)
    losses = state.losses
    return TrainResult(state.progress.step, losses[-1] if losses else None, state.eval_loss,
                       state.tokens / state.seconds if state.seconds else 0.0, interrupted, losses, state.seconds)


def _evaluate(model, eval_rows, cfg: TrainSection, metrics: MetricsLog, step: int, objective: Objective, batcher: Batcher = batches,
              replicas: Replicas = SINGLE_PROCESS) -> float:
    # every rank evaluates its shard of each global eval batch (FSDP needs every rank in every forward)
    local = [replicas.shard(b) for b in batcher(eval_rows, cfg.per_device_eval_batch_size * replicas.world_size, shuffle=False)]
    loss = evaluate_loss(model, local, cfg.bf16, objective)
    loss = replicas.weighted_mean(loss, sum(objective.label_count(b) for b in local))
    # bitsandbytes may repack a 4-bit weight in an eval pass, after which backward drops input
    # gradients; undo that before training goes on (a no-op for unquantized bases).
    ensure_4bit_trainable(unwrap_model(model))
    metrics.write({"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))})
    return loss


class _NoMetrics:
    """Ranks other than 0 write no metrics."""

    def write(self, record: dict) -> None:
        pass


def _quiet(*_: object) -> None:
    pass


def _initial_adapter(model, output_dir: Path, resumed_from: Path | None, log: Callable[[str], None]) -> Path | None:
    """For PiSSA / OLoRA (which move part of W into the adapter), the adapter as initialised, saved once in
    output_dir/initial_adapter, so the final adapter is written as plain LoRA of the original base
    (lora/conversion.py); None for every other init, or when a resumed run lacks it."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    init = getattr(config, "init_lora_weights", True)
    if not (isinstance(init, str) and init.startswith(CONVERTIBLE)):
        return None
    path = output_dir / "initial_adapter"
    if resumed_from is None:
        model.save_pretrained(path)
    elif not (path / "adapter_model.safetensors").is_file():
        log(f"no {path}: the {init} adapter is saved for the residual base, not converted to the original one")
        return None
    return path


def _resume_path(cfg: TrainSection) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = latest_checkpoint(cfg.output_dir)
        if found is None:
            raise LorakitError(f"no checkpoint under {cfg.output_dir}/checkpoints to resume from; drop --resume_from_checkpoint")
        return found
    return Path(cfg.resume_from_checkpoint)
