"""The slot-cache decoder against transformers' own forward pass."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lorakit.errors import LorakitError
from lorakit.infer.decoder import SlotDecoder, apply_rotary
from tests.helpers import make_tiny_gpt2, make_tiny_llama


def test_rotary_matches_transformers() -> None:
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    for mine, theirs in zip(apply_rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


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
