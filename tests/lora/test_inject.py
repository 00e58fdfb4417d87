"""inject_adapter (every check before the first change), exclude_modules, mark_trainable, and the
peft-style parameter report."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lorakit import LoraConfig
from lorakit.errors import ConfigError
from lorakit.lora.inject import count_parameters, inject_adapter, mark_trainable, trainable_report
from lorakit.lora.layer import LoraLinear, ModulesToSave
from tests.helpers import make_tiny_gpt2, make_tiny_llama


def wrapped(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def fingerprint(model: nn.Module) -> tuple:
    """Module types by path and every tensor of the state dict."""
    types = [(name, type(module)) for name, module in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return types, state


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    types, state = fingerprint(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


# --- what gets wrapped --------------------------------------------------------------------------------

def test_targets_are_wrapped_and_nothing_else():
    model = make_tiny_llama()
    inject_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert wrapped(model) == expected
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    layer = model.model.layers[1].self_attn.v_proj
    assert layer.lora_A["a"].weight.shape == (4, 64) and layer.lora_B["a"].weight.shape == (32, 4)


def test_a_fresh_adapter_changes_no_output():
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        inject_adapter(model, LoraConfig(r=4, target_modules="all-linear"), "a")
        after = model(ids).logits
    assert torch.equal(before, after)


def test_all_linear_expands_to_every_linear_leaf_but_the_head():
    model = make_tiny_llama()
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
    stored = inject_adapter(model, LoraConfig(r=2, target_modules="all-linear"), "a")
    assert sorted(stored.target_modules) == sorted(leaves)
    assert "lm_head" not in wrapped(model) and isinstance(model.lm_head, nn.Linear)
    assert len(wrapped(model)) == 2 * len(leaves)


def test_a_second_adapter_joins_the_existing_wrapper():
    model = make_tiny_llama()
    inject_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]), "a")
    layer = model.model.layers[0].self_attn.q_proj
    inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "k_proj"]), "b")
    assert model.model.layers[0].self_attn.q_proj is layer  # not wrapped twice
    assert isinstance(layer.base_layer, nn.Linear)
    assert set(layer.lora_A) == {"a", "b"}
    assert set(model.model.layers[0].self_attn.k_proj.lora_A) == {"b"}


def test_fan_in_fan_out_is_set_from_the_layers_layout():
    llama_config = LoraConfig(r=2, target_modules=["q_proj"])
    assert inject_adapter(make_tiny_llama(), llama_config, "a").fan_in_fan_out is False
    gpt2_stored = inject_adapter(make_tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]), "a")
    assert gpt2_stored.fan_in_fan_out is True  # GPT-2's Conv1D stores (in, out)


# --- every check first: a bad config leaves the model untouched -------------------------------------

def test_a_non_linear_target_leaves_the_model_untouched():
    model = make_tiny_llama()
    before = fingerprint(model)
    # q_proj is fine and comes first, but "mlp" names LlamaMLP modules: nothing may be wrapped
    with pytest.raises(ConfigError, match="mlp"):
        inject_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "mlp"]), "a")
    assert wrapped(model) == set()
    assert_unchanged(model, before)


def test_targets_matching_nothing_leave_the_model_untouched():
    model = make_tiny_llama()
    before = fingerprint(model)
    with pytest.raises(ConfigError, match="q_prj"):
        inject_adapter(model, LoraConfig(r=4, target_modules=["q_prj"]), "a")
    assert_unchanged(model, before)


def test_modules_to_save_matching_nothing_leaves_the_model_untouched():
    model = make_tiny_llama()
    before = fingerprint(model)
    with pytest.raises(ConfigError, match="modules_to_save"):
        inject_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["no_such_head"]), "a")
    assert_unchanged(model, before)


def test_exclude_modules_removes_matches():
    model = make_tiny_llama()
    inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                     exclude_modules=["model.layers.0.self_attn.q_proj"]), "a")
    assert wrapped(model) == {"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                              "model.layers.1.self_attn.v_proj"}


def test_exclude_modules_as_a_regex():
    model = make_tiny_llama()
    inject_adapter(model, LoraConfig(r=2, target_modules="all-linear", exclude_modules=r".*\.mlp\..*"), "a")
    names = wrapped(model)
    assert names and not any(".mlp." in n for n in names)
    assert all(".self_attn." in n for n in names) and len(names) == 2 * 4


def test_excluding_every_target_is_refused_untouched():
    model = make_tiny_llama()
    before = fingerprint(model)
    with pytest.raises(ConfigError, match="exclude_modules"):
        inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], exclude_modules=["q_proj"]), "a")
    assert_unchanged(model, before)


def test_no_lora_inside_a_module_trained_in_full():
    model = make_tiny_llama()
    inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]), "a")
    assert isinstance(model.lm_head, ModulesToSave)
    assert isinstance(model.lm_head.original_module, nn.Linear)
    assert "lm_head" not in wrapped(model)


# --- mark_trainable -----------------------------------------------------------------------------------

def test_mark_trainable_only_the_named_adapter():
    model = make_tiny_llama()
    inject_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    inject_adapter(model, LoraConfig(r=2, target_modules=["v_proj", "up_proj"]), "b")
    mark_trainable(model, "a", "none")
    names = {n for n, _ in model.named_parameters()}
    assert trainable_names(model) == {n for n in names if re.search(r"\.lora_[AB]\.a\.", n)}
    mark_trainable(model, "b", "none")
    assert trainable_names(model) == {n for n in names if re.search(r"\.lora_[AB]\.b\.", n)}


def test_mark_trainable_bias_all_and_lora_only():
    model = make_tiny_gpt2()  # GPT-2's Conv1D layers have biases
    inject_adapter(model, LoraConfig(r=2, target_modules=["c_attn"]), "a")
    names = {n for n, _ in model.named_parameters()}
    adapter = {n for n in names if ".lora_" in n}
    assert adapter

    mark_trainable(model, "a", "lora_only")
    assert trainable_names(model) == adapter | {n for n in names if n.endswith("c_attn.base_layer.bias")}

    mark_trainable(model, "a", "all")
    assert trainable_names(model) == adapter | {n for n in names if n.endswith("bias")}
    assert any("mlp.c_fc.bias" in n for n in trainable_names(model))  # a bias outside the adapted layers


def test_mark_trainable_the_modules_to_save_copy_not_the_original():
    model = make_tiny_llama()
    inject_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "a")
    mark_trainable(model, "a", "none")
    trainable = trainable_names(model)
    assert "lm_head.modules_to_save.a.weight" in trainable
    assert "lm_head.original_module.weight" not in trainable
    assert not any(n.startswith("model.embed_tokens") or "base_layer" in n for n in trainable)


# --- the parameter report -------------------------------------------------------------------------------

def test_count_parameters_equals_a_count_of_requires_grad():
    model = make_tiny_llama()
    base_total = sum(p.numel() for p in model.parameters())
    inject_adapter(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), "a")
    mark_trainable(model, "a", "none")
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    # r (in + out) per adapted layer: q_proj 64 -> 64, v_proj 64 -> 32 (2 KV heads of 16), 2 layers
    assert trainable == 2 * (8 * (64 + 64) + 8 * (64 + 32))
    assert total == base_total + trainable


def test_trainable_report_numbers():
    model = make_tiny_llama()
    inject_adapter(model, LoraConfig(r=4, target_modules=["k_proj", "down_proj"]), "a")
    mark_trainable(model, "a", "none")
    report = trainable_report(model)
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", report)
    assert match, report
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert int(match[1].replace(",", "")) == trainable
    assert int(match[2].replace(",", "")) == total
    assert float(match[3]) == pytest.approx(100 * trainable / total, abs=1e-4)


def test_report_matches_peft():
    peft = pytest.importorskip("peft")
    ours = make_tiny_llama()
    from lorakit import get_peft_model

    lora = get_peft_model(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"]))
    theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"]))
    assert lora.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
