"""Expert LoRA (target_parameters) served in mixed batches: every row gets its own adapters on the experts.

The engine runs an MoE MLP as transformers' module under the step's routing, and LoraModel's
`adapter_names` door does the same through transformers' forward; lora/expert.py groups the experts'
tokens by their row's adapter mix. The oracle is each row alone on the plain active-adapter path (no
routing at all): set_adapter(name), disable_adapter() for "__base__", and for a mix the adapters' B scaled
by their weights and set active together (peft sums active adapters)."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.infer.engine import Engine
from lorakit.infer.sampling import SamplingParams
from tests.helpers import ToyTokenizer
from tests.infer.test_decoder import tiny_family

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
FAMILIES = {
    "MixtralConfig": dict(MOE, sliding_window=None),
    "Qwen3MoeConfig": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1),
    "GptOssConfig": MOE,
}
PROMPTS = ["hello there", "a", "the quick brown fox", "lorem ipsum", "xyz"]
ROWS = ["a", "b", "__base__", {"a": 0.5, "b": 0.5}, "a"]


def expert_lora_model(config_class: str):
    """A tiny MoE model with two adapters on its experts (different ranks and targets), B non-zero and large
    enough to change greedy tokens."""
    model = tiny_family(config_class, **FAMILIES[config_class])
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS), "a")
    lora.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], target_parameters=["experts.down_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return lora.eval()


def alone(model, row):
    """A copy of `model` that computes `row`'s adapters on the active-adapter path, and the context to run it in."""
    model = copy.deepcopy(model)
    if row == "__base__":
        return model, model.disable_adapter()
    mix = {row: 1.0} if isinstance(row, str) else row
    with torch.no_grad():
        for name, param in model.named_parameters():
            for adapter, weight in mix.items():
                if f"lora_B.{adapter}." in name:
                    param.mul_(weight)
    model.set_adapter(list(mix))
    return model, torch.no_grad()


def greedy_alone(model, prompt: str, row, n: int) -> list[int]:
    oracle, context = alone(model, row)
    ids = torch.tensor([ToyTokenizer().encode(prompt)])
    with context, torch.no_grad():
        out = oracle.model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("config_class", sorted(FAMILIES))
def test_the_engine_gives_every_row_of_a_mixed_batch_its_expert_adapters(config_class: str) -> None:
    model = expert_lora_model(config_class)
    engine = Engine.from_model(model, ToyTokenizer(), max_len=64, max_batch=len(PROMPTS))
    params = SamplingParams(max_tokens=8)
    together = engine.generate(PROMPTS, ROWS, params)
    one_by_one = [engine.generate([p], [r], params)[0] for p, r in zip(PROMPTS, ROWS)]
    engine.close()
    assert [o.token_ids for o in together] == [o.token_ids for o in one_by_one]
    for prompt, row, out in zip(PROMPTS, ROWS, together):
        assert out.token_ids == greedy_alone(model, prompt, row, 8)[: len(out.token_ids)], row
    # the expert adapters change the tokens: "a" on the first prompt is not what the base says there
    assert together[0].token_ids != greedy_alone(model, PROMPTS[0], "__base__", 8)[: len(together[0].token_ids)]


@pytest.mark.parametrize("config_class", sorted(FAMILIES))
def test_adapter_names_through_transformers_forward_equal_each_row_alone(config_class: str) -> None:
    model = expert_lora_model(config_class)
    ids = torch.randint(2, 128, (len(ROWS), 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mixed = model(ids, adapter_names=ROWS).logits
    for b, row in enumerate(ROWS):
        oracle, context = alone(model, row)
        with context, torch.no_grad():
            expected = oracle.model(ids[b:b + 1]).logits[0]
        torch.testing.assert_close(mixed[b], expected, atol=1e-5, rtol=1e-5)
    assert (mixed[0] - mixed[2]).abs().max() > 1e-2  # adapter "a" really differs from the base row
    assert (mixed[3] - mixed[0]).abs().max() > 1e-3  # and the mix from "a" alone


def test_expert_adapters_cannot_route_while_merged() -> None:
    from lorakit.errors import LorakitError

    model = get_peft_model(tiny_family("MixtralConfig", **FAMILIES["MixtralConfig"]), LoraConfig(target_parameters=EXPERTS), "a").eval()
    model.merge_adapter()
    with pytest.raises(LorakitError, match="unmerge_adapter"):
        model(torch.tensor([[3, 4, 5]]), adapter_names=["a"])


@pytest.mark.parametrize("config_class", ["MixtralConfig", "Qwen3MoeConfig"])
def test_batch_invariant_mode_gives_identical_bf16_tokens_with_expert_adapters(config_class: str) -> None:
    model = expert_lora_model(config_class).to(torch.bfloat16)
    engine = Engine.from_model(model, ToyTokenizer(), max_len=64, max_batch=8, deterministic=True)
    params = SamplingParams(max_tokens=8)
    prompts, rows = PROMPTS + PROMPTS[:3], ROWS + ROWS[:3]
    handles = [engine.submit(p, r, params) for p, r in zip(prompts, rows)]
    together = [h.result().token_ids for h in handles]
    alone = [engine.generate([p], [r], params)[0].token_ids for p, r in zip(prompts, rows)]
    engine.close()
    assert together == alone


def test_a_router_adapter_runs_grouped_by_mix_and_equals_each_row_alone() -> None:
    """A router's 2-D weight is no experts projection: its rows are grouped by mix (lora/expert_routing.py)."""
    model = tiny_family("MixtralConfig", **FAMILIES["MixtralConfig"])
    lora = get_peft_model(model, LoraConfig(r=4, target_parameters=["gate.weight", "experts.down_proj"]), "a")
    lora.add_adapter("b", LoraConfig(r=2, target_parameters=["gate.weight"]))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    lora.eval()
    ids = torch.randint(2, 128, (len(ROWS), 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        mixed = lora(ids, adapter_names=ROWS).logits
    for b, row in enumerate(ROWS):
        oracle, context = alone(lora, row)
        with context, torch.no_grad():
            torch.testing.assert_close(mixed[b], oracle.model(ids[b:b + 1]).logits[0], atol=1e-5, rtol=1e-5)
    assert (mixed[1] - mixed[2]).abs().max() > 1e-3  # "b" adapts only the router, and that changes the output


def test_adapters_loaded_and_unloaded_while_serving_rebuild_the_expert_banks(tmp_path) -> None:
    """A peft-format expert adapter loaded into a running engine (and another unloaded) serves at once:
    the per-expert banks follow the slot table, never a stale one."""
    model = expert_lora_model("MixtralConfig")
    engine = Engine.from_model(model, ToyTokenizer(), max_len=64, max_batch=4)
    params = SamplingParams(max_tokens=6)
    engine.generate(PROMPTS[:2], ["a", "b"], params)  # banks built for slots a, b
    extra = expert_lora_model("MixtralConfig")
    with torch.no_grad():
        for name, param in extra.named_parameters():
            if "lora_B.a." in name:
                param.mul_(-1)  # a different adapter under the same layout
    extra.save_pretrained(tmp_path, selected_adapters=["a"])
    engine.registry.load("c", tmp_path / "a")
    engine.registry.unload("b")
    rows = ["c", "a", "__base__", {"a": 0.5, "c": 0.5}]
    served = [o.token_ids for o in engine.generate(PROMPTS[:4], rows, params)]
    engine.close()
    oracle = expert_lora_model("MixtralConfig")
    oracle.delete_adapter("b")
    oracle.load_adapter(tmp_path / "a", adapter_name="c")
    assert served == [greedy_alone(oracle, p, r, 6)[: len(s)] for p, r, s in zip(PROMPTS, rows, served)]
    assert served[0] != served[1]
