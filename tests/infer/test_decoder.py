"""The slot-cache decoder against transformers' own forward pass."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from lorakit.errors import LorakitError
from lorakit.infer.decoder import SlotDecoder, rms_norm, rotate, signed_sin
from tests.helpers import make_tiny_gpt2, make_tiny_llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_bit_equal_to_transformers(dtype: torch.dtype) -> None:
    q, k = torch.randn(2, 4, 5, 16, dtype=dtype), torch.randn(2, 2, 5, 16, dtype=dtype)
    cos, sin = torch.randn(2, 5, 16, dtype=dtype), torch.randn(2, 5, 16, dtype=dtype)
    theirs = apply_rotary_pos_emb(q, k, cos, sin)  # heads before positions: (B, heads, T, D)
    sin_signed = signed_sin(sin)[:, None]
    for x, reference in zip((q, k), theirs):
        assert torch.equal(rotate(x, cos[:, None], sin_signed), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_bit_equal_to_transformers(dtype: torch.dtype) -> None:
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = (torch.randn(4, 3, 48) * 3).to(dtype)
    assert torch.equal(rms_norm(norm)(x), norm(x))
    other = torch.nn.LayerNorm(48)
    assert rms_norm(other) is other  # anything else runs as its module


@pytest.mark.parametrize("rowwise", [False, True])
def test_prefill_and_decode_give_transformers_logits(rowwise: bool) -> None:
    model = make_tiny_llama()
    decoder = SlotDecoder(model)
    cache = decoder.allocate(3, 32)
    prompts = [torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    logits = decoder.prefill(cache, 0, ids, torch.tensor([7, 3, 5]))
    nxt = torch.tensor([11, 12, 13])
    step = decoder.decode(cache, nxt, torch.tensor([7, 3, 5]), rowwise=rowwise)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            full = model(torch.cat([p, nxt[i : i + 1]])[None]).logits[0]
            torch.testing.assert_close(logits[i], full[-2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[i], full[-1], atol=1e-5, rtol=1e-5)


def test_other_architectures_are_refused_with_one_line() -> None:
    with pytest.raises(LorakitError, match="Llama-style decoders"):
        SlotDecoder(make_tiny_gpt2())
