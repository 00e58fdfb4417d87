"""train/attention.py per family: a packed row's loss and gradients equal its examples run one by one
through the model's own attention (transformers as the oracle), for families whose attention is more
than causal softmax: Gemma 2 (softcapping, sliding layers), Gemma 3 (sliding layers), Mistral (a
sliding window), gpt-oss (sinks, sliding layers); Llama 4's chunked layers against transformers' own
chunked mask. Examples are longer than the window or chunk, so it matters."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.data import IGNORE_INDEX
from lorakit.errors import LorakitError
from lorakit.train import attention
from lorakit.train.step import batch_loss_sum
from tests.helpers import randomize_lora_b

WINDOW = 6
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**SHAPE, sliding_window=WINDOW, attn_logit_softcapping=2.0, final_logit_softcapping=None))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**SHAPE, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=WINDOW))


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    model = GptOssForCausalLM(GptOssConfig(**SHAPE, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                                           layer_types=["sliding_attention", "full_attention"]))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 1)  # zero-initialised sinks would still take probability, but hide mistakes
    return model


FAMILIES = {"gemma2": _gemma2, "gemma3": _gemma3, "mistral": _mistral, "gpt_oss": _gpt_oss}


def _example(length: int, prompt: int, seed: int) -> tuple[list[int], list[int]]:
    ids = torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ids, [IGNORE_INDEX] * prompt + ids[prompt:]


def _packed(examples) -> dict:
    return {"input_ids": torch.tensor([sum((e[0] for e in examples), [])]),
            "labels": torch.tensor([sum((e[1] for e in examples), [])]),
            "position_ids": torch.tensor([sum((list(range(len(e[0]))) for e in examples), [])]),
            "seq_lens": [[len(e[0]) for e in examples]]}


def _lora(factory):
    torch.manual_seed(0)
    model = get_peft_model(factory().eval(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_equal_examples_one_by_one(family):
    model = _lora(FAMILIES[family])
    examples = [_example(17, 5, 0), _example(4, 1, 1), _example(11, 3, 2)]  # 17 and 11 > WINDOW, 4 within it
    loss, count = batch_loss_sum(model, _packed(examples), bf16=False)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    singles, single_count = 0.0, 0
    for ids, labels in examples:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]  # the model's own attention and masks
        targets = torch.tensor(labels[1:])
        keep = targets != IGNORE_INDEX
        singles = singles + torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
        single_count += int(keep.sum())
    singles.backward()
    assert count == single_count
    torch.testing.assert_close(loss, singles.detach(), rtol=1e-5, atol=1e-4)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=1e-5)


def test_the_window_is_what_makes_the_difference(monkeypatch):
    """Without the terms (plain causal attention, as before), a Gemma 2 row gives another loss: the test above can fail."""
    model = _lora(_gemma2)
    batch = _packed([_example(17, 5, 0), _example(11, 3, 2)])
    with torch.no_grad():
        right, _ = batch_loss_sum(model, batch, bf16=False)
        monkeypatch.setattr(attention, "_attention_terms", lambda module, kwargs: attention.AttentionTerms())
        wrong, _ = batch_loss_sum(model, batch, bf16=False)
    assert abs(right.item() - wrong.item()) > 1e-3


def test_a_bidirectional_model_is_refused_in_one_line():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    model = get_peft_model(Gemma3ForCausalLM(Gemma3TextConfig(**SHAPE, use_bidirectional_attention=True)),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(LorakitError, match="Gemma3Attention attends in both directions"):
        batch_loss_sum(model, _packed([_example(8, 2, 0)]), bf16=False)


def test_a_chunked_layer_attends_within_its_chunk_as_transformers_masks_it():
    """Llama 4's chunked layers (only their mask says so): the twin against transformers' chunked mask
    function with plain masked softmax. (Llama 4 itself cannot train yet: train/step.py reads its decoder
    through base_model_prefix "language_model", which Llama4ForCausalLM does not have.)"""
    from transformers import Llama4TextConfig
    from transformers.masking_utils import causal_mask_function, chunked_overlay

    class Chunked(torch.nn.Module):
        config = Llama4TextConfig(num_hidden_layers=1, attention_chunk_size=WINDOW, layer_types=["chunked_attention"])
        layer_idx = 0

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator) for shape in [(4, 17, 8), (2, 17, 8), (2, 17, 8)])
    terms = attention._attention_terms(Chunked(), {})
    assert terms.chunk == WINDOW
    got = attention._one_example(q, k, v, 8 ** -0.5, 0.0, terms)
    overlay = chunked_overlay(WINDOW, torch.tensor([0]))
    allowed = torch.tensor([[causal_mask_function(0, 0, i, j) and bool(overlay(0, 0, i, j)) for j in range(17)] for i in range(17)])
    scores = (q @ k.repeat_interleave(2, dim=0).transpose(1, 2)) * 8 ** -0.5
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v.repeat_interleave(2, dim=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(attention._one_example(q, k, v, 8 ** -0.5, 0.0), expected, atol=1e-3)  # plain causal differs
