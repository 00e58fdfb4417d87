"""A packed row gives the same losses as its examples run one by one."""

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.data import IGNORE_INDEX
from lorakit.train import attention
from lorakit.train.loss import causal_lm_loss_sum
from lorakit.train.step import batch_loss_sum
from tests.helpers import make_tiny_llama, randomize_lora_b


def _example(length: int, prompt: int, seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (length,), generator=g).tolist()
    return ids, [IGNORE_INDEX] * prompt + ids[prompt:]


def _packed_batch(examples):
    ids = sum((e[0] for e in examples), [])
    labels = sum((e[1] for e in examples), [])
    positions = sum((list(range(len(e[0]))) for e in examples), [])
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "seq_lens": [[len(e[0]) for e in examples]]}


def test_packed_row_matches_examples_one_by_one():
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    examples = [_example(17, 5, 0), _example(30, 12, 1), _example(9, 2, 2)]
    # Labels of the packed row must not let one example predict the next one's first token.
    packed = _packed_batch(examples)
    packed_sum, packed_count = batch_loss_sum(model, packed, bf16=False)

    singles_sum, singles_count = 0.0, 0
    for ids, labels in examples:
        out = model(input_ids=torch.tensor([ids]))
        logits = out.logits[0, :-1]
        targets = torch.tensor(labels[1:])
        keep = targets != IGNORE_INDEX
        singles_sum += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
        singles_count += int(keep.sum())
    assert packed_count == singles_count
    torch.testing.assert_close(packed_sum, singles_sum, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bmm_max_len", [1024, 22])  # 22: the 25-token example takes SDPA's flash kernel
def test_packed_gradients_match_examples_one_by_one(monkeypatch, bmm_max_len):
    monkeypatch.setattr(attention, "BMM_ATTENTION_MAX_LEN", bmm_max_len)
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    examples = [_example(20, 4, 3), _example(25, 10, 4)]
    loss, _ = batch_loss_sum(model, _packed_batch(examples), bf16=False)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for ids, labels in examples:
        out = model(input_ids=torch.tensor([ids]))
        targets = torch.tensor(labels[1:])
        keep = targets != IGNORE_INDEX
        torch.nn.functional.cross_entropy(out.logits[0, :-1][keep], targets[keep], reduction="sum").backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=1e-5)


def test_chunked_head_loss_equals_full_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = IGNORE_INDEX
    loss, count = causal_lm_loss_sum(hidden, labels, head, chunk=4)
    loss.backward()
    fast_grad = hidden.grad.clone()
    hidden.grad = None
    reference = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    reference.backward()
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(fast_grad, hidden.grad)


def test_head_loss_without_gradients_matches_the_training_path():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    training, count = causal_lm_loss_sum(hidden, labels, head, chunk=4)
    with torch.no_grad():
        evaluation, eval_count = causal_lm_loss_sum(hidden, labels, head, chunk=4)
    assert eval_count == count and not evaluation.requires_grad
    torch.testing.assert_close(evaluation, training.detach())


def test_head_loss_in_bf16_keeps_fp32_log_probabilities():
    """bf16 hidden states: logits in bf16 (as autocast makes them), the loss from fp32 log-softmax."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False).to(torch.bfloat16)
    hidden = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    loss, _ = causal_lm_loss_sum(hidden, labels, head, chunk=4)
    loss.backward()
    fast_grad = hidden.grad.clone()
    hidden.grad = None
    logits = head(hidden[:, :-1]).float().reshape(-1, 50)
    reference = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum")
    reference.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast_grad.float(), hidden.grad.float(), rtol=2e-2, atol=2e-2)
