"""Data-parallel and sharded LoRA training on torch.distributed, launched by torchrun.

    torchrun --nproc_per_node 2 -m lorakit train my.yaml       (or: lorakit train my.yaml --nproc 2)

Every process builds the same model, packs the same rows and reads the same seeded order of *global*
micro-batches (world_size x per_device_train_batch_size rows); rank r trains on its slice of each. One
optimizer step, on every rank:

    n = all_reduce(labels in this rank's k micro-batches)        # the step's global label count
    for each micro-batch: backward of loss_sum / n               # no communication (DDP's no_sync)
    all_reduce(one flat buffer: every adapter gradient + the loss sum)     # the one sync point
    clip, AdamW                                                  # identical on every rank

so N processes with batch b train exactly as one process with batch N*b (same rows, same normaliser).

Why an explicit all-reduce and not DistributedDataParallel: the objectives call the decoder and the
chunked head directly, never `LoraModel.forward`, which DDP needs to arm its reducer; and the adapter's
gradients are a few MB, where DDP's overlap of bucketed all-reduces with backward saves almost nothing
(bench/scaling.py measures the all-reduce). One coalesced all-reduce after the last micro-step is what
DDP with `no_sync()` on the inner micro-steps does, without the wrapper.

`fsdp: true` shards the frozen base with FSDP2 (`fully_shard` per decoder layer; gathered for each
layer's forward and backward, freed after): base memory per process falls to ~1/N. The adapter stays
replicated (`ignored_params`), so its gradients, clipping, checkpoints and files are the data-parallel
ones. FSDP2 runs on CPU with gloo (torch >= 2.6) and on CUDA with nccl.

Only rank 0 writes (metrics, loss.png, checkpoints, the adapter) and logs. Checkpoints record the
layout (world size, micro-batch rows, global batch), so a run saved by N processes resumes on M: the
global batch is kept by changing gradient_accumulation_steps, with a one-line notice."""

from __future__ import annotations

import dataclasses
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.errors import LorakitError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Replicas:
    """The processes training one adapter together; the default is a single process (no communication)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def global_label_count(self, count: int) -> int:
        """This rank's label count summed over all ranks: the step's normaliser."""
        if not self.distributed:
            return count
        total = torch.tensor([count], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return int(total.item())

    def reduce_gradients(self, params: Sequence[nn.Parameter], loss_sum: float) -> float:
        """Sum every parameter's gradient and `loss_sum` over the ranks in one all-reduce of one flat
        fp32 buffer (the adapter: a few MB); returns the global loss sum. A sync point."""
        if not self.distributed:
            return loss_sum
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads] + [torch.tensor([loss_sum], device=self.device)])
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads):
            n = grad.numel()
            param.grad = flat[offset : offset + n].view_as(grad).to(grad.dtype)
            offset += n
        return float(flat[-1])

    def weighted_mean(self, value: float, weight: float) -> float:
        """The mean of `value` over ranks, each weighted by `weight` (eval loss by label count)."""
        if not self.distributed:
            return value
        both = torch.tensor([value * weight, weight], dtype=torch.float64, device=self.device)
        dist.all_reduce(both)
        return float(both[0] / both[1].clamp(min=1))

    def broadcast_parameters(self, params: Sequence[nn.Parameter]) -> None:
        """Rank 0's values everywhere (same seeds already give the same init; this makes it certain)."""
        if self.distributed:
            for param in params:
                dist.broadcast(param.data, src=0)

    def shard(self, batch: dict) -> dict:
        """This rank's slice of a global micro-batch: rows split into world_size contiguous parts (b rows
        each for a full batch). A rank left without rows (the short last batch of an epoch) gets one row
        with every label masked, so every rank runs the same forwards (FSDP needs that) and adds nothing."""
        if not self.distributed:
            return batch
        rows = len(batch["input_ids"])
        lo, hi = rows * self.rank // self.world_size, rows * (self.rank + 1) // self.world_size
        if lo < hi:
            return {k: v[lo:hi] for k, v in batch.items()}
        empty = {k: v[:1] for k, v in batch.items()}
        empty["labels"] = torch.full_like(empty["labels"], IGNORE_INDEX)
        if "padding" in empty:
            empty["padding"] = [int(batch["input_ids"][0].numel())]
        return empty


SINGLE_PROCESS = Replicas()


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def pick_backend(device_type: str) -> str:
    """nccl for CUDA, gloo for the CPU; an unavailable one is a one-line error."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    available = dist.is_available() and (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available())
    if not available:
        raise LorakitError(f"torch.distributed backend {backend!r} is not available in this torch build "
                           f"({torch.__version__}); install a build with {backend} or train on one process")
    return backend


def init_distributed(timeout_s: float = 1800.0) -> Replicas:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment);
    a single process when not launched by torchrun. Each CUDA process takes the GPU of its LOCAL_RANK."""
    if not launched_by_torchrun():
        return Replicas(device=torch.device("cuda", 0)) if torch.cuda.is_available() else SINGLE_PROCESS
    rank, world, local = (int(os.environ[name]) for name in TORCHRUN_ENV)
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise LorakitError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); lower --nproc_per_node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = pick_backend(device.type)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Replicas(rank, world, local, device, backend)


@contextmanager
def leaving_process_group() -> Iterator[None]:
    """Leave the process group (if this process joined one) when the block ends. After a normal end,
    wait at a barrier first, so no process tears its group down while another still uses it: rank 0
    is still saving when the others finish, and under FSDP a rank that left early aborted at exit
    ("terminate called without an active exception") about one run in twenty. After an error, leave
    at once: the other processes may be gone, and a barrier would wait for them until the timeout."""
    try:
        yield
    except BaseException:
        _destroy_process_group()
        raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    _destroy_process_group()


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_base(hf_model: nn.Module, replicas: Replicas) -> int:
    """FSDP2 over the frozen base: `fully_shard` on each decoder layer, the adapter's parameters left
    out (`ignored_params`: replicated, plain tensors, reduced by `Replicas.reduce_gradients`). Embeddings,
    the final norm and the head stay whole (the chunked loss reads the head's weight directly). Returns
    how many layers were sharded."""
    if not replicas.distributed:
        return 0
    from torch.distributed.fsdp import fully_shard

    layers = _decoder_layers(hf_model)
    trainable = {p for p in hf_model.parameters() if p.requires_grad}
    for layer in layers:
        fully_shard(layer, ignored_params=trainable & set(layer.parameters()))
    return len(layers)


def _decoder_layers(hf_model: nn.Module) -> Sequence[nn.Module]:
    decoder = getattr(hf_model, getattr(hf_model, "base_model_prefix", "model"), hf_model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise LorakitError(f"fsdp: no decoder layer list found in {type(hf_model).__name__}; train without fsdp")


# --- the batch layout: how many rows a micro-batch and a step hold, across processes -------------------


@dataclass(frozen=True)
class Layout:
    """Rows per micro-batch over all processes, micro-batches per step, and the processes."""

    world_size: int
    micro_batch_rows: int  # world_size x per_device_train_batch_size
    accumulation: int

    @property
    def global_batch_rows(self) -> int:
        return self.micro_batch_rows * self.accumulation

    def record(self) -> dict[str, int]:
        """What a checkpoint stores to resume on another number of processes."""
        return {"world_size": self.world_size, "micro_batch_rows": self.micro_batch_rows, "global_batch_rows": self.global_batch_rows}


def plan_layout(per_device: int, accumulation: int, global_batch_size: int, world_size: int) -> Layout:
    """The run's layout; `global_batch_size` > 0 fixes the rows per step and sets the accumulation."""
    micro = per_device * world_size
    if global_batch_size <= 0:
        return Layout(world_size, micro, accumulation)
    if global_batch_size % micro:
        raise LorakitError(f"global_batch_size {global_batch_size} is not divisible by {world_size} process(es) x "
                           f"per_device_train_batch_size {per_device} = {micro} rows per micro-batch; choose a multiple of {micro}")
    return Layout(world_size, micro, global_batch_size // micro)


def resume_layout(saved: dict[str, Any], current: Layout, batch_in_epoch: int, log: Callable[[str], None]) -> tuple[Layout, int]:
    """Continue a checkpoint's run on this run's processes: keep its global batch (adjusting the accumulation)
    and convert its data position into this run's micro-batches. Returns the layout and the position."""
    if "micro_batch_rows" not in saved:  # written by a single-process lorakit before layouts were recorded
        return current, batch_in_epoch
    old = Layout(saved["world_size"], saved["micro_batch_rows"], saved["global_batch_rows"] // saved["micro_batch_rows"])
    if old.micro_batch_rows == current.micro_batch_rows and old.accumulation == current.accumulation:
        return current, batch_in_epoch
    micro, rows_done = current.micro_batch_rows, batch_in_epoch * old.micro_batch_rows
    if old.global_batch_rows % micro or rows_done % micro:
        raise LorakitError(f"the checkpoint's global batch of {old.global_batch_rows} rows (position: row {rows_done} of its epoch) "
                           f"does not split into micro-batches of {current.world_size} process(es) x {micro // current.world_size} rows; "
                           f"choose per_device_train_batch_size so that {current.world_size} x it divides {old.global_batch_rows}")
    layout = dataclasses.replace(current, accumulation=old.global_batch_rows // micro)
    log(f"resuming a {old.world_size}-process checkpoint on {current.world_size}: gradient_accumulation_steps "
        f"{old.accumulation} -> {layout.accumulation} keeps the global batch at {old.global_batch_rows} rows")
    return layout, rows_done // micro


# --- `lorakit train --nproc N`: torchrun with the same arguments -----------------------------------------


def launch(nproc: int, lorakit_args: Sequence[str]) -> int:
    """Run `python -m lorakit <lorakit_args>` on `nproc` local processes through torchrun
    (torch.distributed.run, --standalone rendezvous on a free local port). A worker that fails stops
    the others; the error names its rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise LorakitError(f"--nproc must be >= 1 (got {nproc})")
    args = get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(nproc), "--module", "lorakit", *lorakit_args])
    try:
        run(args)
    except ChildFailedError as err:
        failures = sorted(err.failures.items())
        named = ", ".join(f"rank {rank} (exit code {f.exitcode})" for rank, f in failures)
        print(f"lorakit train: error: {named} failed; the other processes were stopped. "
              f"The last complete checkpoint (if any) resumes with --resume_from_checkpoint latest", file=sys.stderr)
        return 1
    return 0
