"""A run interrupted at step k and resumed gives the uninterrupted run's losses, step for step."""

import json

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.data.packing import PackedRow
from lorakit.train import loop
from lorakit.train.config import TrainSection
from tests.helpers import make_tiny_llama


def _rows(n: int = 24, length: int = 32) -> list[PackedRow]:
    g = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 128, (length,), generator=g).tolist()
        rows.append(PackedRow(ids, [-100] * 4 + ids[4:], list(range(20)) + list(range(12)), [20, 12], 0))
    return rows


def _model():
    return get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))


def _cfg(out, **kw):
    values = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6,
                  learning_rate=1e-2, warmup_steps=2, logging_steps=1, save_steps=3, bf16=False, seed=3)
    values.update(kw)
    return TrainSection(**values)


def _logged_losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_interrupt_then_resume_matches_uninterrupted(tmp_path, monkeypatch):
    rows = _rows()
    full = loop.train(_model(), rows, [], _cfg(tmp_path / "full"), log=lambda *_: None)

    real_step, calls = loop._optimizer_step, {"n": 0}

    def interrupted_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_optimizer_step", interrupted_step)
    first = loop.train(_model(), rows, [], _cfg(tmp_path / "cut"), log=lambda *_: None)
    assert first.interrupted and first.steps == 4
    assert (tmp_path / "cut" / "checkpoints" / "step-000004" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "cut" / "adapter").exists()  # no final adapter from an interrupted run

    monkeypatch.setattr(loop, "_optimizer_step", real_step)
    torch.manual_seed(12345)  # resume must not depend on the process's RNG state
    resumed = loop.train(_model(), rows, [], _cfg(tmp_path / "cut", resume_from_checkpoint="latest"), log=lambda *_: None)
    assert resumed.steps == 6
    assert _logged_losses(tmp_path / "cut") == pytest.approx(_logged_losses(tmp_path / "full"), rel=1e-6, abs=1e-7)
    assert len(_logged_losses(tmp_path / "full")) == 6 == len(full.losses)


def test_accumulation_equals_one_big_batch(tmp_path):
    rows = _rows(8)
    torch.manual_seed(0)
    one = _model()
    loop.train(one, rows, [], _cfg(tmp_path / "a", per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=1, save_steps=0), log=lambda *_: None)
    torch.manual_seed(0)
    two = _model()
    loop.train(two, rows, [], _cfg(tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1, save_steps=0), log=lambda *_: None)
    assert _logged_losses(tmp_path / "a") == pytest.approx(_logged_losses(tmp_path / "b"), rel=1e-5)


def test_training_lowers_the_loss_and_writes_outputs(tmp_path):
    rows = _rows(8)
    result = loop.train(_model(), rows, rows[:4], _cfg(tmp_path, max_steps=12, save_steps=0, learning_rate=3e-2), log=lambda *_: None)
    assert result.losses[-1] < result.losses[0]
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "loss.png"):
        assert (tmp_path / name).is_file(), name
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r and "eval_perplexity" in r for r in records)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    rows = _rows(8)
    plain = loop.train(_model(), rows, [], _cfg(tmp_path / "a", max_steps=3, save_steps=0), log=lambda *_: None)
    checkpointed = loop.train(_model(), rows, [], _cfg(tmp_path / "b", max_steps=3, save_steps=0, gradient_checkpointing=True), log=lambda *_: None)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
