"""The slot-cache decoder against transformers' own forward pass."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from lorakit.errors import LorakitError
from lorakit.infer.decoder import Norms, SlotDecoder, rotate, signed_sin
from lorakit.lora.routing import Routing
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
    norms = Norms([norm])
    assert norms.plain and norms.norms[0].data_ptr() == norm.weight.data_ptr() and not norms.norms[0].requires_grad
    assert torch.equal(norms(norms.norms[0], x), norm(x))
    norm.weight.data = torch.rand(48, dtype=dtype) + 0.5  # new storage, as Module.to gives
    norms.refresh()
    assert torch.equal(norms(norms.norms[0], x), norm(x))
    other = Norms([norm, torch.nn.LayerNorm(48)])
    assert not other.plain and other.norms[1] is not None and torch.equal(other(other.norms[0], x), norm(x))  # kept as modules


@pytest.mark.parametrize("rowwise", [False, True])
def test_prefill_and_decode_give_transformers_logits(rowwise: bool) -> None:
    model = make_tiny_llama()
    decoder = SlotDecoder(model)
    cache = decoder.allocate(3, 32)
    prompts = [torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    logits = decoder.prefill(cache, 0, ids, torch.tensor([7, 3, 5]), None)
    nxt = torch.tensor([11, 12, 13])
    step = decoder.decode(cache, nxt, torch.tensor([7, 3, 5]), None, rowwise=rowwise)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            full = model(torch.cat([p, nxt[i : i + 1]])[None]).logits[0]
            torch.testing.assert_close(logits[i], full[-2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[i], full[-1], atol=1e-5, rtol=1e-5)


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=1)


def tiny_family(config_class: str, **overrides):
    """A tiny random causal LM of a family, built from transformers' own config class for it."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**TINY, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_other_architectures_are_refused_with_one_line() -> None:
    with pytest.raises(LorakitError, match="does not run the 'gpt2' family"):
        SlotDecoder(make_tiny_gpt2())


def _decode_both(eager: SlotDecoder, compiled: SlotDecoder, prompts: torch.Tensor, rows_per_step: Sequence[int],
                 routing: Routing | None = None):
    """Prefill the same prompts in both decoders' caches, then decode steps of these many rows in each
    (under `routing`, made for every prompt's row): yields (eager logits, compiled logits, eager cache,
    compiled cache, rows) per step."""
    caches = [decoder.allocate(len(prompts), 32) for decoder in (eager, compiled)]
    lengths = torch.full((len(prompts),), prompts.shape[1])
    for decoder, cache in zip((eager, compiled), caches):
        decoder.prefill(cache, 0, prompts, lengths, routing)
    for rows in rows_per_step:
        tokens, positions = torch.arange(3, 3 + rows), lengths[:rows]
        yield (*(d.decode(c, tokens, positions, routing) for d, c in zip((eager, compiled), caches)), *caches, rows)


def test_compiled_decode_gives_the_eager_logits_and_cache_in_fp32() -> None:
    model = make_tiny_llama(num_hidden_layers=7)  # compiled in a chunk of five layers and one of two
    eager, compiled = SlotDecoder(model), SlotDecoder(model, compile=True)
    assert compiled.compiled is not None
    prompts = torch.randint(2, 128, (4, 6), generator=torch.Generator().manual_seed(0))
    for mine, theirs, my_cache, their_cache, rows in _decode_both(eager, compiled, prompts, (4, 1)):  # one row: a graph of its own
        torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-5)
        for ours, its in zip(my_cache.keys + my_cache.values, their_cache.keys + their_cache.values):
            torch.testing.assert_close(its[:rows, :, 6], ours[:rows, :, 6], atol=1e-5, rtol=1e-5)


def test_compiled_decode_runs_each_rows_adapters_in_bf16() -> None:
    from tests.helpers import tiny_lora_model

    model = tiny_lora_model(dtype=torch.bfloat16)
    eager, compiled = SlotDecoder(model.model), SlotDecoder(model.model, compile=True)
    assert eager.attention_kernel is None and compiled.attention_kernel is not None  # bf16: the C++ kernel attends
    prompts = torch.randint(2, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    (mine, theirs, *_), = _decode_both(eager, compiled, prompts, (3,), model.routing(["a", "__base__", {"b": 0.7, "c": 0.3}]))
    torch.testing.assert_close(theirs.float(), mine.float(), atol=0.05 * float(mine.abs().max()), rtol=0.02)


def test_compiling_falls_back_to_eager_where_it_does_not_apply() -> None:
    model = make_tiny_llama()
    model.model.layers[0].mlp = torch.nn.Identity()  # not a gated MLP
    assert SlotDecoder(model, compile=True).compiled is None


def test_a_failed_compilation_warns_and_decodes_eagerly() -> None:
    decoder = SlotDecoder(make_tiny_llama(), compile=True)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore")

    decoder.compiled = no_compiler
    cache = decoder.allocate(2, 256)
    with pytest.warns(UserWarning, match="InvalidCxxCompiler: no working C.. compiler found\\); decoding eagerly"):
        decoder.warm_up(cache)
    assert decoder.compiled is None and cache.capacity == 64
    decoder.decode(cache, torch.tensor([3, 4]), torch.tensor([0, 0]), None)  # eagerly
