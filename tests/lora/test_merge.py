"""merge_and_unload / unload over a whole model, and safe_merge's NaN / inf check before any change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import LorakitError
from lorakit.lora.layer import LoraLinear, ModulesToSave
from lorakit.lora.merge import check_finite_merge, merge_and_unload, unload
from tests.helpers import make_tiny_llama, randomize_lora_b, tiny_lora_model

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def no_lora_left(model: nn.Module) -> bool:
    return not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules())


def linears_are_plain(model: nn.Module) -> bool:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    return all(type(m) is nn.Linear for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names)


def test_merge_and_unload_keeps_the_adapted_logits():
    lora = tiny_lora_model()
    base = logits(make_tiny_llama())
    adapted = logits(lora)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter really changes the output
    merged = lora.merge_and_unload()
    assert no_lora_left(merged) and linears_are_plain(merged)
    assert torch.allclose(logits(merged), adapted, atol=1e-4)


def test_merge_and_unload_of_several_named_adapters():
    lora = tiny_lora_model()
    lora.set_adapter(["a", "b"])
    both = logits(lora)
    merged = merge_and_unload(lora.get_base_model(), adapter_names=["a", "b"])
    assert no_lora_left(merged)
    assert torch.allclose(logits(merged), both, atol=1e-4)


def test_merge_and_unload_of_an_inactive_named_adapter():
    lora = tiny_lora_model()
    lora.set_adapter("c")
    only_c = logits(lora)
    lora.set_adapter("a")
    merged = merge_and_unload(lora.get_base_model(), adapter_names=["c"])
    assert torch.allclose(logits(merged), only_c, atol=1e-4)


def test_an_already_merged_adapter_is_not_added_twice():
    lora = tiny_lora_model()
    adapted = logits(lora)
    lora.merge_adapter()
    merged = lora.merge_and_unload()
    assert torch.allclose(logits(merged), adapted, atol=1e-4)


def test_merged_weight_is_base_plus_scaled_b_a():
    lora = tiny_lora_model()
    layer = lora.get_base_model().model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight.detach().clone() + layer.scaling["a"] * (
        layer.lora_B["a"].weight.detach() @ layer.lora_A["a"].weight.detach())
    merged = lora.merge_and_unload()
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6)


def test_merge_and_unload_in_another_dtype():
    lora = tiny_lora_model()
    merged = lora.merge_and_unload(dtype=torch.bfloat16)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.bfloat16
    assert merged.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16  # adapted by "b" only


def test_unload_gives_the_base_logits():
    lora = tiny_lora_model()
    base = logits(make_tiny_llama())
    plain = lora.unload()
    assert no_lora_left(plain) and linears_are_plain(plain)
    assert torch.allclose(logits(plain), base, atol=1e-6)


def test_unload_after_an_in_place_merge_restores_the_base():
    lora = tiny_lora_model()
    base = logits(make_tiny_llama())
    lora.merge_adapter()
    assert not torch.allclose(logits(lora), base, atol=1e-3)
    plain = unload(lora.get_base_model())
    assert torch.allclose(logits(plain), base, atol=1e-4)


def test_modules_to_save_leave_their_active_copy_on_merge_and_the_original_on_unload():
    for operation in ("merge", "unload"):
        model = make_tiny_llama()
        original = model.lm_head.weight.detach().clone()
        lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        with torch.no_grad():
            lora.get_base_model().lm_head.modules_to_save["default"].weight.add_(1.0)
        result = lora.merge_and_unload() if operation == "merge" else lora.unload()
        assert type(result.lm_head) is nn.Linear
        expected = original + 1.0 if operation == "merge" else original
        assert torch.equal(result.lm_head.weight, expected), operation


def poison(lora, path: str, value: float) -> None:
    with torch.no_grad():
        lora.get_base_model().get_submodule(path).lora_B["a"].weight[0, 0] = value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_safe_merge_refuses_nan_or_inf_and_changes_nothing(value):
    lora = tiny_lora_model()
    # the last adapted layer: a layer-by-layer merge would have changed every earlier one already
    poison(lora, "model.layers.1.self_attn.v_proj", value)
    model = lora.get_base_model()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrappers = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    with pytest.raises(LorakitError, match="NaN or inf"):
        lora.merge_and_unload(safe_merge=True)
    assert {n for n, m in model.named_modules() if isinstance(m, LoraLinear)} == wrappers
    after = dict(model.named_parameters())
    assert after.keys() == weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(after[name], weight, rtol=0, atol=0, equal_nan=True)


def test_check_finite_merge_names_the_broken_layer_and_ignores_inactive_adapters():
    lora = tiny_lora_model()
    with torch.no_grad():
        lora.get_base_model().model.layers[0].mlp.gate_proj.lora_B["c"].weight.fill_(float("nan"))
    check_finite_merge(lora.get_base_model())  # "c" is not active: merging "a" is fine
    with pytest.raises(LorakitError, match=r"model\.layers\.0\.mlp\.gate_proj"):
        check_finite_merge(lora.get_base_model(), ["c"])


def test_without_safe_merge_a_nan_adapter_is_merged():
    lora = tiny_lora_model()
    poison(lora, "model.layers.0.self_attn.q_proj", float("nan"))
    merged = lora.merge_and_unload()
    assert torch.isnan(merged.model.layers[0].self_attn.q_proj.weight).any()


def test_a_fresh_adapter_merges_to_the_base_weights():
    model = make_tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    merged = lora.merge_and_unload(safe_merge=True)
    assert {n: p for n, p in merged.named_parameters()}.keys() == base.keys()
    assert all(torch.equal(p, base[n]) for n, p in merged.named_parameters())


def test_randomized_adapter_changes_merged_weights():
    model = make_tiny_llama()
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj"]))
    randomize_lora_b(lora)
    base_o = make_tiny_llama().model.layers[0].self_attn.o_proj.weight
    merged = lora.merge_and_unload()
    assert not torch.allclose(merged.model.layers[0].self_attn.o_proj.weight, base_o)
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, make_tiny_llama().model.layers[0].self_attn.q_proj.weight)
