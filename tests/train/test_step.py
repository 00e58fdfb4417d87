"""The training step: normalised backward, pluggable objectives, the model's device for autocast, and
training paths that never reach another thread using the same model."""

import threading
from contextlib import nullcontext

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.data import IGNORE_INDEX
from lorakit.lora.model import unwrap_model
from lorakit import device
from lorakit.train import fused, step
from lorakit.train.attention import PACKED_ATTENTION
from tests.helpers import make_tiny_llama, randomize_lora_b


def _model():
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    return model


def _batch(rows: int = 2, length: int = 24) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(length).repeat(rows, 1), "seq_lens": [[length]] * rows}


def test_train_step_backpropagates_the_loss_sum_over_the_given_normaliser():
    model, batch = _model(), _batch()
    loss_sum, count = step.forward_loss(model, batch, bf16=False)
    (loss_sum / 7).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = step.train_step(model, batch, normaliser=7, bf16=False)
    assert out.count == count == step.CAUSAL_LM.label_count(batch) == 2 * 23 - 2 * 5
    assert float(out.loss_sum) == pytest.approx(float(loss_sum.detach())) and not out.loss_sum.requires_grad
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad)


class _LastTokenObjective:
    """A stand-in second objective (as sequence classification will be): loss on the last position only."""

    packed_rows = False

    def loss_sum(self, model, batch):
        logits = model(input_ids=batch["input_ids"]).logits[:, -1]  # (B, V)
        return torch.nn.functional.cross_entropy(logits.float(), batch["target"], reduction="sum"), len(batch["target"])

    def label_count(self, batch):
        return len(batch["target"])


def test_another_objective_plugs_into_the_same_step():
    model = _model()
    batch = {"input_ids": torch.randint(0, 128, (3, 10)), "target": torch.tensor([1, 2, 3])}
    objective = _LastTokenObjective()
    out = step.train_step(model, batch, objective.label_count(batch), objective, bf16=False)
    assert out.count == 3
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
    assert step.evaluate_loss(model, [batch], bf16=False, objective=objective) == pytest.approx(float(out.loss_sum) / 3, rel=1e-5)


def test_autocast_follows_the_model_device():
    model = _model()
    assert device.model_device(model) == torch.device("cpu")
    assert device.autocast(torch.device("cpu"), True).fast_dtype == torch.bfloat16
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext():  # "CUDA is not available"
        assert device.autocast(torch.device("cuda"), True).device == "cuda"
    assert not isinstance(device.autocast(torch.device("cpu"), False), torch.autocast)


def test_training_paths_do_not_reach_another_thread_using_the_model(monkeypatch):
    """Thread A trains (inside training_paths); thread B generates on the same model at that moment, with
    a left-padded batch: B's logits are those of the model without training paths, and B never runs
    the lean kernels."""
    model = _model().eval()
    hf_model = unwrap_model(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: packed attention would ignore it
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    before = hf_model.config._attn_implementation

    calls: dict[str, int] = {}
    real_rms_norm = fused.rms_norm

    def counting_rms_norm(*args):
        name = threading.current_thread().name
        calls[name] = calls.get(name, 0) + 1
        return real_rms_norm(*args)

    monkeypatch.setattr(fused, "rms_norm", counting_rms_norm)
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def trainer():
        with step.training_paths(hf_model):
            seen["implementation"] = hf_model.config._attn_implementation
            with torch.no_grad():
                seen["trainer_logits"] = model(input_ids=ids, attention_mask=mask).logits
            inside.set()
            done.wait(timeout=60)

    a = threading.Thread(target=trainer, name="trainer")
    a.start()
    assert inside.wait(timeout=60)
    try:
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
    finally:
        done.set()
        a.join()
    assert seen["implementation"] == PACKED_ATTENTION and calls.get("trainer", 0) > 0  # A did take the training paths
    assert not (seen["trainer_logits"][1] - expected[1]).abs().max() < 1e-4  # ...which ignore padding
    assert calls.get(threading.current_thread().name, 0) == 0
    torch.testing.assert_close(got, expected)
    assert hf_model.config._attn_implementation == before  # restored when the last trainer left
    assert not any("forward" in m.__dict__ for m in model.modules())
