"""Every family the engine runs natively (infer/families.py), against transformers on tiny random models:
the decoder's logits, and the engine's greedy tokens with adapters, a base row and a mix in one batch."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import LorakitError
from lorakit.infer.decoder import SlotDecoder
from lorakit.infer.engine import Engine
from lorakit.infer.families import FAMILIES, layout_of
from lorakit.infer.sampling import SamplingParams
from tests.helpers import ToyTokenizer, randomize_lora_b
from tests.infer.test_decoder import tiny_family

MOE = dict(num_local_experts=4, num_experts_per_tok=2)
# config class -> overrides: small sliding windows, so the prompts below cross them
FAMILY_CONFIGS = {
    "LlamaConfig": {},
    "MistralConfig": dict(sliding_window=4),
    "Qwen2Config": {},
    "Qwen3Config": {},
    "MixtralConfig": dict(MOE, sliding_window=None),
    "Qwen3MoeConfig": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1),
    "Gemma2Config": dict(sliding_window=4),
    "Gemma3TextConfig": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "Phi3Config": dict(partial_rotary_factor=0.5),
    "Olmo2Config": {},
    "GraniteConfig": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0),
    "GptOssConfig": dict(MOE),
}
PROMPTS = ["hello there", "a", "the quick brown fox", "lorem ipsum"]
ROWS = ["a", "b", "__base__", {"a": 0.5, "b": 0.5}]


def family_model(config_class: str) -> torch.nn.Module:
    """A tiny random model of the family with its 1-D weights (norms, sinks) random too: Gemma's norms
    start at zero, which would hide a missing (1 + w)."""
    model = tiny_family(config_class, **FAMILY_CONFIGS[config_class])
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_(0.0, 0.3)
    return model


def family_lora(config_class: str, dtype: torch.dtype = torch.float32):
    """Two adapters on every linear layer (as "all-linear" finds them), with non-zero B."""
    lora = get_peft_model(family_model(config_class).to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), "a")
    lora.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    randomize_lora_b(lora, 3)
    return lora.eval()


def test_every_family_config_here_has_a_layout_and_back() -> None:
    families = {tiny_family(name, **overrides).config.model_type for name, overrides in FAMILY_CONFIGS.items()}
    assert families == set(FAMILIES)


@pytest.mark.parametrize("config_class", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("rowwise", [False, True])
def test_prefill_and_decode_give_transformers_logits(config_class: str, rowwise: bool) -> None:
    model = family_model(config_class)
    decoder = SlotDecoder(model)
    cache = decoder.allocate(2, 32)
    prompts = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    new = torch.tensor([[11, 12, 13], [12, 13, 14]])
    logits = [decoder.prefill(cache, 0, prompts, torch.tensor([6, 6]), None)]
    logits += [decoder.decode(cache, new[:, i], torch.tensor([6 + i, 6 + i]), None, rowwise=rowwise) for i in range(3)]
    with torch.no_grad():
        full = model(torch.cat([prompts, new], dim=1)).logits
    for i, mine in enumerate(logits):
        torch.testing.assert_close(mine, full[:, 5 + i], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("config_class", sorted(FAMILY_CONFIGS))
def test_a_prefill_after_a_cached_prefix_gives_transformers_logits(config_class: str) -> None:
    model = family_model(config_class)
    decoder = SlotDecoder(model)
    cache = decoder.allocate(1, 32)
    prompt = torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    decoder.prefill(cache, 0, prompt[:, :5], torch.tensor([5]), None)
    logits = decoder.prefill(cache, 0, prompt[:, 5:], torch.tensor([4]), None, start=5)  # over the cached 5 (past the window)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(prompt).logits[:, -1], atol=2e-5, rtol=1e-5)


def hf_greedy(lora, prompt: str, row, n: int) -> list[int]:
    ids = torch.tensor([ToyTokenizer().encode(prompt)])
    with torch.no_grad():
        out = lora.generate(ids, adapter_names=[row], max_new_tokens=n, do_sample=False, eos_token_id=None,
                            attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("config_class", sorted(FAMILY_CONFIGS))
def test_engine_greedy_tokens_equal_transformers_generate_with_adapters_a_base_row_and_a_mix(config_class: str) -> None:
    lora = family_lora(config_class)
    engine = Engine.from_model(lora, ToyTokenizer(), max_len=64, max_batch=4)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = engine.generate(PROMPTS, ROWS, params)
    engine.close()
    expected = [hf_greedy(lora, p, r, 8) for p, r in zip(PROMPTS, ROWS)]
    assert [o.token_ids for o in outs] == expected
    assert len({tuple(e) for e in expected}) > 1  # the rows really differ


@pytest.mark.parametrize("config_class", ["Gemma3TextConfig", "Gemma2Config", "GptOssConfig", "Phi3Config", "Olmo2Config", "GraniteConfig"])
def test_bf16_batch_invariant_mode_gives_each_row_its_tokens_alone(config_class: str) -> None:
    lora = family_lora(config_class, torch.bfloat16)
    engine = Engine.from_model(lora, ToyTokenizer(), max_len=64, max_batch=4, deterministic=True)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    together = [h.result().token_ids for h in [engine.submit(p, r, params) for p, r in zip(PROMPTS, ROWS)]]
    alone = [engine.generate([p], [r], params)[0].token_ids for p, r in zip(PROMPTS, ROWS)]
    engine.close()
    assert together == alone


@pytest.mark.parametrize("config_class", ["Gemma3TextConfig", "GraniteConfig", "Phi3Config"])
def test_bf16_decode_with_the_cpp_kernels_gives_the_torch_logits(config_class: str) -> None:
    lora = family_lora(config_class, torch.bfloat16)
    plain, native = SlotDecoder(lora.model), SlotDecoder(lora.model, compile=True)
    assert native.attention_kernel is not None
    prompts = torch.randint(2, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    routing = lora.routing(["a", "__base__", {"a": 0.7, "b": 0.3}])
    caches = [d.allocate(3, 32) for d in (plain, native)]
    for d, c in zip((plain, native), caches):
        d.prefill(c, 0, prompts, torch.full((3,), 6), routing)
    mine, theirs = (d.decode(c, torch.tensor([3, 4, 5]), torch.full((3,), 6), routing) for d, c in zip((plain, native), caches))
    torch.testing.assert_close(theirs.float(), mine.float(), atol=0.05 * float(mine.abs().max()), rtol=0.02)


def test_a_family_without_a_layout_is_refused_in_one_line() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
    with pytest.raises(LorakitError, match="does not run the 'gpt_neox' family") as refused:
        SlotDecoder(model)
    assert "\n" not in str(refused.value)


def test_a_bidirectional_gemma_is_refused_in_one_line() -> None:
    model = tiny_family("Gemma3TextConfig", use_bidirectional_attention=True)
    with pytest.raises(LorakitError, match="attends bidirectionally"):
        layout_of(model)


def test_a_model_missing_its_familys_modules_is_refused_in_one_line() -> None:
    model = family_model("Olmo2Config")
    del model.model.layers[1].post_feedforward_layernorm
    with pytest.raises(LorakitError, match="no post_feedforward_layernorm where its family's layers have them"):
        SlotDecoder(model)


COMPILED = {"Gemma3TextConfig": dict(num_hidden_layers=4, sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2),
            "Gemma2Config": dict(sliding_window=64), "Qwen3Config": {}, "Olmo2Config": {}, "Phi3Config": dict(partial_rotary_factor=0.5),
            "GraniteConfig": FAMILY_CONFIGS["GraniteConfig"]}


@pytest.mark.parametrize("config_class", sorted(COMPILED))
def test_the_compiled_decode_step_gives_the_eager_logits(config_class: str) -> None:
    model = tiny_family(config_class, **{**FAMILY_CONFIGS[config_class], **COMPILED[config_class]})
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.normal_(0.0, 0.3)
    eager, compiled = SlotDecoder(model), SlotDecoder(model, compile=True)
    assert compiled.compiled is not None
    if config_class == "Gemma3TextConfig":
        assert compiled.chunk == 2  # the sliding / global period: every chunk one graph
    prompts = torch.randint(2, 128, (3, 6), generator=torch.Generator().manual_seed(4))
    caches = [d.allocate(3, 32) for d in (eager, compiled)]
    for d, c in zip((eager, compiled), caches):
        d.prefill(c, 0, prompts, torch.full((3,), 6), None)
    for i in range(3):
        tokens, positions = torch.tensor([3 + i, 4 + i, 5 + i]), torch.full((3,), 6 + i)
        mine, theirs = (d.decode(c, tokens, positions, None) for d, c in zip((eager, compiled), caches))
        torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-5)
