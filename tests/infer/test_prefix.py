"""Prefix caching: cached prompt blocks give the tokens a full prefill gives, per adapter mix, bounded."""

from __future__ import annotations

import torch

from lorakit.infer.decoder import SlotDecoder
from lorakit.infer.engine import Engine, prefix_key
from lorakit.infer.prefix import BLOCK, PrefixCache, block_keys
from lorakit.infer.sampling import SamplingParams
from tests.helpers import ToyTokenizer, tiny_lora_model

SHARED = "You are a careful assistant. Answer briefly: "  # more than two blocks of the toy tokenizer's tokens


def test_prefill_after_a_cached_prefix_gives_the_full_prefill_logits() -> None:
    model = tiny_lora_model()
    decoder = SlotDecoder(model.model)
    ids = torch.randint(2, 128, (3, 2 * BLOCK + 7), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([2 * BLOCK + 7, 2 * BLOCK + 3, 2 * BLOCK + 5])  # right-padded rows
    routing = model.routing(["a", "__base__", {"b": 0.7, "c": 0.3}])
    full = decoder.prefill(decoder.allocate(3, 64), 0, ids, lengths, routing)
    cache = decoder.allocate(3, 64)
    decoder.prefill(cache, 0, ids[:, : 2 * BLOCK], torch.full((3,), 2 * BLOCK), routing)
    rest = decoder.prefill(cache, 0, ids[:, 2 * BLOCK :], lengths - 2 * BLOCK, routing, start=2 * BLOCK)
    torch.testing.assert_close(rest, full, atol=1e-5, rtol=1e-5)


def test_engine_with_prefix_cache_gives_the_tokens_of_one_without() -> None:
    model = tiny_lora_model()
    prompts = [SHARED + q for q in ("red?", "blue?", "green?", "red?", "two plus two?", "blue?")]
    adapters = ["a", "a", "b", {"a": 0.5, "c": 0.5}, None, "a"]
    params = SamplingParams(max_tokens=8)
    cold = Engine.from_model(model, ToyTokenizer(), max_batch=2, max_len=96, prefix_cache_mb=0)
    warm = Engine.from_model(model, ToyTokenizer(), max_batch=2, max_len=96)
    expected = [out.token_ids for out in cold.generate(prompts, adapters, params)]
    assert [out.token_ids for out in warm.generate(prompts, adapters, params)] == expected
    assert warm.prefixes.hits > 0 and cold.prefixes.hits == 0
    warm.prefixes.clear()
    assert len(warm.prefixes) == 0 and warm.prefixes.nbytes == 0
    assert [out.token_ids for out in warm.generate(prompts, adapters, params)] == expected  # refilled from empty


def test_cached_blocks_belong_to_one_adapter_mix_and_its_weights() -> None:
    model = tiny_lora_model()
    eng = Engine.from_model(model, ToyTokenizer(), max_batch=2, max_len=96)
    prompt = ToyTokenizer().encode(SHARED + "red?")
    eng.generate([prompt], ["a"], SamplingParams(max_tokens=2))
    keys = lambda mix: block_keys(prompt, prefix_key(mix, model.slot_table))  # noqa: E731  (read anew: the table follows the weights)
    assert eng.prefixes.cached_length(prompt, keys({"a": 1.0})) >= 2 * BLOCK
    assert eng.prefixes.cached_length(prompt, keys({"b": 1.0})) == 0
    with torch.no_grad():  # the adapter is trained further in place: its old blocks must not match
        model.model.model.layers[0].self_attn.q_proj.lora_A["a"].weight.add_(0.1)
    assert eng.prefixes.cached_length(prompt, keys({"a": 1.0})) == 0


def test_the_cache_stays_within_its_bytes_evicting_the_least_recently_used() -> None:
    model = tiny_lora_model()
    eng = Engine.from_model(model, ToyTokenizer(), max_batch=1, max_len=96)
    prompts = [ToyTokenizer().encode(f"{i} " + SHARED) for i in range(6)]  # no two share a block
    eng.generate(prompts[:1], ["a"], SamplingParams(max_tokens=1))
    per_prompt = eng.prefixes.nbytes
    eng.prefixes = PrefixCache(max_bytes=2 * per_prompt)
    for prompt in prompts:
        eng.generate([prompt], ["a"], SamplingParams(max_tokens=1))
        assert eng.prefixes.nbytes <= 2 * per_prompt
    mix = prefix_key({"a": 1.0}, model.slot_table)
    last, first = block_keys(prompts[-1], mix), block_keys(prompts[0], mix)
    assert eng.prefixes.cached_length(prompts[-1], last) > 0 and eng.prefixes.cached_length(prompts[0], first) == 0


def test_the_batch_invariant_mode_keeps_no_prefixes() -> None:
    eng = Engine.from_model(tiny_lora_model(), ToyTokenizer(), max_batch=2, max_len=96, deterministic=True)
    eng.generate([SHARED + "red?", SHARED + "blue?"], ["a", "a"], SamplingParams(max_tokens=2))
    assert len(eng.prefixes) == 0 and eng.prefixes.hits == 0


def test_block_keys_chain_each_block_to_the_whole_prefix_before_it() -> None:
    prompt = list(range(5 * BLOCK + 3))
    keys = block_keys(prompt, ("a", 1))
    assert len(keys) == 5 and len(set(keys)) == 5  # full blocks only, all different
    assert block_keys(prompt[: 3 * BLOCK], ("a", 1)) == keys[:3]  # a prefix's keys are the prompt's first ones
    changed = [99] + prompt[1:]  # one token of the first block: every later block's key changes
    assert not set(block_keys(changed, ("a", 1))) & set(keys)
    swapped = prompt[BLOCK : 2 * BLOCK] + prompt[:BLOCK] + prompt[2 * BLOCK :]  # same blocks, other order
    assert block_keys(swapped, ("a", 1))[1:] != keys[1:]
    assert not set(block_keys(prompt, ("b", 1))) & set(keys)  # another mix: no block shared
