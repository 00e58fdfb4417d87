"""Data-parallel scaling on this machine: 1 process x 2 threads against 2 processes x 1 thread (torchrun,
gloo), the same global batch, and the all-reduce per optimizer step (the adapter's gradients, one flat
fp32 buffer). Prints the measurements and a projection for N machines from them.

    .venv/bin/python bench/scaling.py                       # the default model, ~3 minutes on an idle machine
    .venv/bin/python bench/scaling.py --model tiny --steps 3 --seq 128     # a smoke run, seconds
    .venv/bin/python bench/scaling.py --json out.json

Both configurations train through `lorakit.train.loop.train` (bf16 autocast, packed rows, r=16 on q,k,v,o)
on the same rows: per-process batch `--rows` rows of `--seq` tokens, accumulation 1, so the 1-process run
takes 2 x rows per step. The first step of each run is a warm-up and is not counted. Run it on an idle
machine: two jobs on two cores slow each other down. What is projected (not measured) is labelled so."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BANDWIDTHS_GBIT = (10, 25, 100)  # assumed inter-machine links for the projection (not measured)
LATENCY_S = 50e-6  # assumed per-message latency of one ring hop (not measured)


def build_model(kind: str):
    import torch

    from lorakit import get_peft_model
    from lorakit.train.config import training_lora

    if kind == "default":
        from lorakit.models.load import load_model

        base = load_model("default", dtype="bfloat16")
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)).to(torch.bfloat16)
    torch.manual_seed(0)
    return get_peft_model(base, training_lora())


def rows(n: int, seq: int, vocab: int):
    """Full packed rows of two examples each, the first quarter of each example a prompt (no loss)."""
    import random

    from lorakit.data.packing import PackedRow
    from lorakit.data.tokenize import IGNORE_INDEX

    rng, out = random.Random(0), []
    for _ in range(n):
        first = rng.randint(seq // 4, 3 * seq // 4)
        ids = [rng.randrange(2, vocab) for _ in range(seq)]
        labels = [IGNORE_INDEX if (i < first and i < first // 4) or (i >= first and i - first < (seq - first) // 4) else t
                  for i, t in enumerate(ids)]
        out.append(PackedRow(ids, labels, list(range(first)) + list(range(seq - first)), [first, seq - first], 0))
    return out


def worker(args: argparse.Namespace) -> None:
    """One configuration (alone, or one rank under torchrun): train, time the steps, time the all-reduce."""
    import torch

    from lorakit.train import loop
    from lorakit.train.config import TrainSection
    from lorakit.train.distributed import init_distributed, shutdown

    torch.set_num_threads(args.threads)
    replicas = init_distributed()
    model = build_model(args.model)
    vocab = model.model.config.vocab_size
    world = replicas.world_size
    per_device = args.rows * (2 // world)  # the same global batch: 2 x rows per step
    data = rows(per_device * world * (args.steps + 1), args.seq, vocab)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainSection(output_dir=out, per_device_train_batch_size=per_device, max_steps=args.steps + 1, logging_steps=1000,
                           warmup_steps=1, seed=0, bf16=True)
        started = time.perf_counter()
        loop.train(model, data, [], cfg, log=lambda *_: None, on_step=lambda _: stamps.append(time.perf_counter()), replicas=replicas)
    step_s = [b - a for a, b in zip([started, *stamps], stamps)][1:]  # step 0 is the warm-up
    tokens_per_step = sum(len(r.input_ids) - r.padding for r in data[: per_device * world])
    params = [p for p in model.parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() for p in params) * 4
    allreduce = []
    if replicas.distributed:
        import torch.distributed as dist

        flat = torch.zeros(grad_bytes // 4 + 1)
        for i in range(args.allreduce_repeats + 2):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(flat)
            if i >= 2:
                allreduce.append(time.perf_counter() - t)
    if replicas.is_main:
        Path(args.out).write_text(json.dumps({
            "processes": world, "threads": args.threads, "step_s": step_s, "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / statistics.median(step_s), "grad_bytes": grad_bytes,
            "allreduce_s": statistics.median(allreduce) if allreduce else 0.0,
        }))
    shutdown()


def measure(args: argparse.Namespace, processes: int, threads: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "result.json"
    common = [__file__, "--worker", "--model", args.model, "--steps", str(args.steps), "--rows", str(args.rows), "--seq", str(args.seq),
              "--threads", str(threads), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    if processes == 1:
        command = [sys.executable, *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *common]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def ring_allreduce_s(grad_bytes: int, machines: int, gbit: float) -> float:
    """Projected ring all-reduce: 2 (N-1)/N of the buffer over each link, 2 (N-1) hops of latency."""
    if machines == 1:
        return 0.0
    return 2 * (machines - 1) / machines * grad_bytes * 8 / (gbit * 1e9) + 2 * (machines - 1) * LATENCY_S


def report(one: dict, two: dict) -> str:
    compute_s = statistics.median(two["step_s"]) - two["allreduce_s"]  # one process's compute per step, 1 thread
    per_process_tokens = two["tokens_per_step"] / two["processes"]
    lines = [
        "measured on this machine (median step after a warm-up step):",
        f"  1 process  x 2 threads: {one['tokens_per_s']:8.0f} tokens/s  ({statistics.median(one['step_s']) * 1e3:.0f} ms/step, "
        f"{one['tokens_per_step']} tokens/step)",
        f"  2 processes x 1 thread: {two['tokens_per_s']:8.0f} tokens/s  ({statistics.median(two['step_s']) * 1e3:.0f} ms/step)"
        f"  = {two['tokens_per_s'] / one['tokens_per_s']:.2f}x",
        f"  all-reduce per step: {two['grad_bytes'] / 2**20:.2f} MiB of adapter gradients (fp32), "
        f"{two['allreduce_s'] * 1e3:.2f} ms over gloo on this machine "
        f"({two['allreduce_s'] / statistics.median(two['step_s']):.1%} of the step)",
        f"  compute per process per step (step - all-reduce): {compute_s * 1e3:.0f} ms for {per_process_tokens:.0f} tokens",
        "",
        "projected for N machines like this one, one process each, the same per-process batch (weak scaling):",
        "  step = compute (measured) + ring all-reduce (projected: assumed link bandwidth, 50 us per hop)",
        "  " + f"{'N':>4} " + "".join(f"{f'{g} Gbit/s: tokens/s (eff.)':>34}" for g in BANDWIDTHS_GBIT),
    ]
    for n in (1, 2, 4, 8, 16, 32):
        cells = []
        for gbit in BANDWIDTHS_GBIT:
            step = compute_s + ring_allreduce_s(two["grad_bytes"], n, gbit)
            cells.append(f"{n * per_process_tokens / step:>24.0f} ({compute_s / step:5.1%})")
        lines.append(f"  {n:>4} " + "".join(f"{c:>34}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("default", "tiny"), default="default")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--rows", type=int, default=2, help="rows per process per step (2 processes); the 1-process run takes twice")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--allreduce-repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    one, two = measure(args, 1, 2), measure(args, 2, 1)
    print(f"bench/scaling.py: model {args.model}, {args.rows} rows x {args.seq} tokens per process per step, {args.steps} timed steps")
    print(report(one, two))
    if args.json:
        Path(args.json).write_text(json.dumps({"one_process": one, "two_processes": two}, indent=1))


if __name__ == "__main__":
    main()
