"""One training process for tests/train/test_distributed.py, run under torchrun (or alone): a tiny Llama,
random packed rows, `loop.train` with the process group torchrun set up. Rank 0 writes result.json."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.helpers

import torch  # noqa: E402

from lorakit import LoraConfig, get_peft_model  # noqa: E402
from lorakit.data import IGNORE_INDEX  # noqa: E402
from lorakit.data.packing import PackedRow  # noqa: E402
from lorakit.train import loop  # noqa: E402
from lorakit.train.config import TrainSection  # noqa: E402
from lorakit.train.distributed import SINGLE_PROCESS, Replicas, init_distributed, leaving_process_group, shard_base  # noqa: E402
from tests.helpers import make_tiny_llama  # noqa: E402


def rows(n: int = 32, length: int = 32) -> list[PackedRow]:
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        ids = torch.randint(0, 128, (length,), generator=g).tolist()
        first = 8 + i % 17  # examples of different lengths: label counts differ between ranks
        out.append(PackedRow(ids, [IGNORE_INDEX] * 4 + ids[4:], list(range(first)) + list(range(length - first)), [first, length - first], 0))
    return out


def model():
    torch.manual_seed(0)
    return get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))


def section(out: str, **kw) -> TrainSection:
    values = dict(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6, learning_rate=1e-2,
                  warmup_steps=1, logging_steps=1, save_steps=2, bf16=False, seed=3)
    values.update(kw)
    return TrainSection(**values)


def run(args: argparse.Namespace, replicas: Replicas = SINGLE_PROCESS, log=print) -> loop.TrainResult:
    lora = model()
    if args.fsdp:
        shard_base(lora.model, replicas)

    def on_step(state: loop.TrainState) -> None:
        if state.progress.step == args.kill_step and replicas.rank == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)  # a rank dies without a word

    cfg = section(args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accumulation,
                  resume_from_checkpoint=args.resume)
    result = loop.train(lora, rows(), [], cfg, log=log, on_step=on_step, replicas=replicas)
    if replicas.is_main:
        Path(args.out, "result.json").write_text(json.dumps({"losses": result.losses, "world_size": replicas.world_size}))
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--resume", default="")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-step", type=int, default=-1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    torch.set_num_threads(1)
    replicas = init_distributed()
    with leaving_process_group():
        run(parse(), replicas)
