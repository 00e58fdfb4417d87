"""merge/dense.py: a LoraModel folded into a plain transformers model gives the unmerged model's outputs."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, LorakitError, get_peft_model
from lorakit.merge import merge_to_dense
from lorakit.merge.directory import merge_dtype
from tests.helpers import make_tiny_llama, randomize_lora_b

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def test_dense_merge_of_a_plain_base_matches_the_adapted_model():
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    randomize_lora_b(model)
    with torch.no_grad():
        expected = model(IDS).logits
        merged = merge_to_dense(model, torch.float32)
        got = merged(IDS).logits
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("float16", torch.float16), (torch.float32, torch.float32)])
def test_merge_dtype_names(name, dtype):
    assert merge_dtype(name) is dtype


@pytest.mark.parametrize("name, message", [("int4", "is unknown"), (torch.int8, "is not supported")])
def test_merge_dtype_refuses_others(name, message):
    with pytest.raises(LorakitError, match=f"{message}; use bf16, fp16 or fp32"):
        merge_dtype(name)
