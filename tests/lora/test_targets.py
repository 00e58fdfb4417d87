"""Which modules a config adapts: peft's rules for lists, regex strings, "all-linear" and exclusions."""

from __future__ import annotations


import pytest

from lorakit import ConfigError, LoraConfig, get_peft_model
from lorakit.lora.targets import find_targets, name_matches, resolve_all_linear

from tests.helpers import make_tiny_gpt2, make_tiny_llama


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        (["q_proj"], "model.layers.0.self_attn.q_proj", True),       # dotted suffix
        (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj", True),
        (["model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj", True),  # exact path
        (["proj"], "model.layers.0.self_attn.q_proj", False),        # a suffix must start at a dot
        (["q_proj"], "model.layers.0.self_attn.q_proj.extra", False),
        (r".*\.q_proj", "model.layers.0.self_attn.q_proj", True),    # a string is a regex...
        (r"q_proj", "model.layers.0.self_attn.q_proj", False),       # ...matched against the whole path
        (r".*layers\.1\..*_proj", "model.layers.0.self_attn.q_proj", False),
    ],
)
def test_name_matches(pattern: list[str] | str, name: str, expected: bool) -> None:
    assert name_matches(pattern, name) is expected


def test_list_targets_match_every_layer() -> None:
    model = make_tiny_llama()
    found = find_targets(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert found == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


def test_regex_target_is_full_matched() -> None:
    model = make_tiny_llama()
    found = find_targets(model, LoraConfig(target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj"))
    assert found == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]


def test_all_linear_leaves_the_output_head_alone() -> None:
    assert resolve_all_linear(make_tiny_llama()) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert resolve_all_linear(make_tiny_gpt2()) == ["c_attn", "c_fc", "c_proj"]
    found = find_targets(make_tiny_llama(), LoraConfig(target_modules="all-linear"))
    assert len(found) == 14 and "lm_head" not in found


def test_all_linear_on_an_adapted_model_sees_the_wrapped_layers() -> None:
    model = get_peft_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("second", LoraConfig(target_modules="all-linear"))
    assert model.peft_config["second"].target_modules == resolve_all_linear(make_tiny_llama())
    q_proj = model.model.model.layers[0].self_attn.q_proj
    assert list(q_proj.lora_A) == ["default", "second"]


def test_exclude_modules_list_and_regex() -> None:
    model = make_tiny_llama()
    found = find_targets(model, LoraConfig(target_modules="all-linear", exclude_modules=["o_proj", "mlp.down_proj"]))
    assert not any(n.endswith(("o_proj", "down_proj")) for n in found) and len(found) == 10
    found = find_targets(model, LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*"))
    assert found == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_targets_matching_nothing_name_the_closest_layers() -> None:
    with pytest.raises(ConfigError) as info:
        find_targets(make_tiny_llama(), LoraConfig(target_modules=["q_prj"]))
    assert "target_modules ['q_prj'] match no module of the model (closest existing: " in str(info.value)
    assert "q_proj" in str(info.value)


def test_targets_with_no_close_name_list_the_linear_layers() -> None:
    with pytest.raises(ConfigError, match=r"linear layers in this model: .*c_attn"):
        find_targets(make_tiny_gpt2(), LoraConfig(target_modules=["zzzzzzzz"]))


def test_exclude_modules_removing_everything_says_so() -> None:
    with pytest.raises(ConfigError, match=r"exclude_modules \['q_proj'\] exclude all 2 modules target_modules"):
        find_targets(make_tiny_llama(), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_unset_targets_are_an_error() -> None:
    with pytest.raises(ConfigError, match="target_modules is not set"):
        find_targets(make_tiny_llama(), LoraConfig())


def test_a_non_linear_target_is_refused_and_nothing_is_wrapped() -> None:
    model = make_tiny_llama()
    with pytest.raises(ConfigError, match="target 'model.layers.0.self_attn' is a LlamaAttention"):
        get_peft_model(model, LoraConfig(target_modules=r".*(q_proj|layers\.0\.self_attn)"))
    assert type(model.model.layers[1].self_attn.q_proj).__name__ == "Linear"


def test_bad_modules_to_save_leaves_the_model_unwrapped() -> None:
    model = make_tiny_llama()
    with pytest.raises(ConfigError, match=r"modules_to_save \['nothing'\] match no module"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["nothing"]))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
