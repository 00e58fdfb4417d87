"""The training loop: exact resume after an interrupt, accumulation, eval_steps, save_total_limit,
checkpointing, and the injectable normaliser."""


import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.data import IGNORE_INDEX
from lorakit.data.packing import PackedRow
from lorakit.train import loop
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.config import TrainSection
from lorakit.train.metrics import read_metrics
from tests.helpers import make_tiny_llama

QUIET = dict(log=lambda *_: None)


def _rows(n: int = 24, length: int = 32) -> list[PackedRow]:
    g = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 128, (length,), generator=g).tolist()
        rows.append(PackedRow(ids, [IGNORE_INDEX] * 4 + ids[4:], list(range(20)) + list(range(12)), [20, 12], 0))
    return rows


def _model():
    return get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))


def _cfg(out, **kw):
    values = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6,
                  learning_rate=1e-2, warmup_steps=2, logging_steps=1, save_steps=3, bf16=False, seed=3)
    values.update(kw)
    return TrainSection(**values)


def _logged_losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _stop_after(step: int):
    def on_step(state: loop.TrainState) -> None:
        if state.progress.step == step:
            raise KeyboardInterrupt  # what Ctrl-C does between two steps
    return on_step


def test_interrupt_then_resume_matches_uninterrupted(tmp_path):
    rows = _rows()
    full = loop.train(_model(), rows, [], _cfg(tmp_path / "full"), **QUIET)

    first = loop.train(_model(), rows, [], _cfg(tmp_path / "cut"), on_step=_stop_after(4), **QUIET)
    assert first.interrupted and first.steps == 4
    assert (tmp_path / "cut" / "checkpoints" / "step-000004" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "cut" / "adapter").exists()  # no final adapter from an interrupted run

    torch.manual_seed(12345)  # resume must not depend on the process's RNG state
    resumed = loop.train(_model(), rows, [], _cfg(tmp_path / "cut", resume_from_checkpoint="latest"), **QUIET)
    assert resumed.steps == 6 and resumed.losses == pytest.approx(full.losses[4:], rel=1e-6, abs=1e-7)
    assert _logged_losses(tmp_path / "cut") == pytest.approx(_logged_losses(tmp_path / "full"), rel=1e-6, abs=1e-7)
    assert len(_logged_losses(tmp_path / "full")) == 6 == len(full.losses)


def test_an_interrupt_inside_a_step_resumes_at_the_start_of_that_step(tmp_path, monkeypatch):
    """A Ctrl-C during a step's backward: the checkpoint holds the previous step and its data position."""
    rows = _rows()
    full = loop.train(_model(), rows, [], _cfg(tmp_path / "full", save_steps=0), **QUIET)
    real_train_step, calls = loop.train_step, {"n": 0}

    def train_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # second micro-batch of step 4
            raise KeyboardInterrupt
        return real_train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", train_step)
    cut = loop.train(_model(), rows, [], _cfg(tmp_path / "cut", save_steps=0), **QUIET)
    assert cut.interrupted and cut.steps == 3
    monkeypatch.setattr(loop, "train_step", real_train_step)
    resumed = loop.train(_model(), rows, [], _cfg(tmp_path / "cut", save_steps=0, resume_from_checkpoint="latest"), **QUIET)
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-6, abs=1e-7)


def test_accumulation_equals_one_big_batch(tmp_path):
    rows = _rows(8)
    torch.manual_seed(0)
    one = _model()
    loop.train(one, rows, [], _cfg(tmp_path / "a", per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=1, save_steps=0), **QUIET)
    torch.manual_seed(0)
    two = _model()
    loop.train(two, rows, [], _cfg(tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1, save_steps=0), **QUIET)
    assert _logged_losses(tmp_path / "a") == pytest.approx(_logged_losses(tmp_path / "b"), rel=1e-5)


def test_the_normaliser_is_the_global_label_count(tmp_path):
    """Data-parallel training passes an all-reduce; here a stand-in 'other process' with as many labels:
    the logged loss (this process's loss sum / global count) halves."""
    rows = _rows(8)
    cfg = dict(max_steps=1, save_steps=0, gradient_accumulation_steps=1)
    alone = loop.train(_model(), rows, [], _cfg(tmp_path / "a", **cfg), **QUIET)
    two = loop.train(_model(), rows, [], _cfg(tmp_path / "b", **cfg), global_label_count=lambda n: 2 * n, **QUIET)
    assert two.losses[0] == pytest.approx(alone.losses[0] / 2, rel=1e-6)


def test_training_lowers_the_loss_and_writes_outputs(tmp_path):
    rows = _rows(8)
    result = loop.train(_model(), rows, rows[:4], _cfg(tmp_path, max_steps=12, save_steps=0, learning_rate=3e-2), **QUIET)
    assert result.losses[-1] < result.losses[0]
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "loss.png"):
        assert (tmp_path / name).is_file(), name
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12] and evals[0]["eval_perplexity"] == pytest.approx(2.718281828 ** evals[0]["eval_loss"])


def test_eval_steps_evaluates_as_training_goes(tmp_path):
    rows = _rows(8)
    result = loop.train(_model(), rows, rows[:4], _cfg(tmp_path, max_steps=7, save_steps=0, eval_steps=3), **QUIET)
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 7]  # every 3 steps, and once at the end
    assert result.eval_loss == evals[-1]["eval_loss"]
    assert len({r["eval_loss"] for r in evals}) == 3  # the adapter changed between evaluations


def test_save_total_limit_keeps_the_newest_and_the_one_resumed_from(tmp_path):
    rows = _rows()
    names = lambda: [p.name for p in list_checkpoints(tmp_path)]  # noqa: E731
    loop.train(_model(), rows, [], _cfg(tmp_path, max_steps=5, save_steps=1, save_total_limit=2), **QUIET)
    assert names() == ["step-000003", "step-000004"]  # none at the last step: the adapter is the result
    resume_from = tmp_path / "checkpoints" / "step-000003"
    loop.train(_model(), rows, [], _cfg(tmp_path, max_steps=9, save_steps=1, save_total_limit=2, resume_from_checkpoint=str(resume_from)), **QUIET)
    assert names() == ["step-000003", "step-000007", "step-000008"]


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    rows = _rows(8)
    plain = loop.train(_model(), rows, [], _cfg(tmp_path / "a", max_steps=3, save_steps=0), **QUIET)
    checkpointed = loop.train(_model(), rows, [], _cfg(tmp_path / "b", max_steps=3, save_steps=0, gradient_checkpointing=True), **QUIET)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def _method_model(**config):
    values = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **config)
    torch.manual_seed(0)
    return get_peft_model(make_tiny_llama(), LoraConfig(**values))


def test_dora_with_loraplus_trains_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    rows, settings = _rows(), dict(loraplus_lr_ratio=8.0, save_steps=0)
    model = _method_model(use_dora=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}
    full = loop.train(model, rows, [], _cfg(tmp_path / "full", **settings), **QUIET)
    assert full.losses[-1] < full.losses[0]
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if "magnitude" in n)
    loop.train(_method_model(use_dora=True), rows, [], _cfg(tmp_path / "cut", **settings), on_step=_stop_after(3), **QUIET)
    resumed = loop.train(_method_model(use_dora=True), rows, [], _cfg(tmp_path / "cut", resume_from_checkpoint="latest", **settings), **QUIET)
    assert resumed.losses == full.losses[3:]
    files = [load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("full", "cut")]
    assert any(k.endswith("lora_magnitude_vector") for k in files[0])
    for key, value in files[0].items():
        assert torch.equal(files[1][key], value), key


def test_a_pissa_run_writes_plain_lora_of_the_original_base(tmp_path):
    import peft

    model = _method_model(init_lora_weights="pissa")
    loop.train(model, _rows(), [], _cfg(tmp_path, save_steps=0), **QUIET)
    assert (tmp_path / "initial_adapter" / "adapter_model.safetensors").is_file()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits  # the residual base with the trained adapter
        in_peft = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")
        assert in_peft.peft_config["default"].r == 8 and in_peft.peft_config["default"].init_lora_weights is True
        torch.testing.assert_close(in_peft(ids).logits, expected, atol=1e-5, rtol=1e-5)
