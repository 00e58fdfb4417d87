"""LoraConfig validation: one test per message, several problems at once, and peft's config files."""

from __future__ import annotations

import pytest

from lorakit import ConfigError, LoraConfig, LorakitError, TaskType


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "r must be a positive integer (got 0); try r=8 or r=16"),
        (dict(r=-4), "r must be a positive integer (got -4)"),
        (dict(r=2.5), "r must be a positive integer (got 2.5)"),
        (dict(lora_alpha=0), "lora_alpha must be > 0 (got 0); a common choice is 2 * r"),
        (dict(lora_alpha=-1.0), "lora_alpha must be > 0 (got -1.0)"),
        (dict(lora_dropout=1.0), "lora_dropout must be in [0, 1) (got 1.0)"),
        (dict(lora_dropout=-0.1), "lora_dropout must be in [0, 1) (got -0.1)"),
        (dict(bias="some"), "bias must be one of none, all, lora_only (got 'some')"),
        (dict(task_type="CAUSAL"), "task_type 'CAUSAL' is unknown; use one of CAUSAL_LM, SEQ_CLS"),
        (dict(target_modules=3), "target_modules must be a list of module names or a regex string (got 3)"),
        (dict(exclude_modules=[1]), "exclude_modules must be a list of module names or a regex string (got [1])"),
    ],
)
def test_each_invalid_value_has_its_own_message(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kwargs)
    assert message in str(info.value)
    assert len(info.value.problems) == 1
    assert str(info.value).startswith("invalid LoraConfig: ")


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        LoraConfig(r=0, lora_alpha=-1, lora_dropout=1.5, bias="some", task_type="X")
    problems = info.value.problems
    assert len(problems) == 5
    assert [p.split(" ")[0] for p in problems] == ["r", "lora_alpha", "lora_dropout", "bias", "task_type"]
    assert "\n" not in str(info.value)


def test_config_error_is_a_value_error_and_a_lorakit_error() -> None:
    with pytest.raises(ValueError):
        LoraConfig(r=0)
    with pytest.raises(LorakitError):
        LoraConfig(r=0)


def test_every_field_is_documented_once_and_settings_are_the_user_facing_ones() -> None:
    import dataclasses

    from lorakit.config import settings

    assert all(f.metadata.get("help") for f in dataclasses.fields(LoraConfig))
    names = [f.name for f in settings(LoraConfig)]
    assert "exclude_modules" in names and "task_type" in names
    assert not {"fan_in_fan_out", "base_model_name_or_path", "inference_mode"} & set(names)


def test_task_type_enum_is_stored_as_its_name() -> None:
    assert LoraConfig(task_type=TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"


def test_sets_are_accepted_like_peft() -> None:
    config = LoraConfig(target_modules={"v_proj", "q_proj"}, exclude_modules={"o_proj"}, modules_to_save={"lm_head"})
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.exclude_modules == ["o_proj"]
    assert config.modules_to_save == ["lm_head"]


def test_peft_dict_round_trip() -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj"], lora_dropout=0.1, bias="lora_only",
                        use_rslora=True, modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    data = config.to_peft_dict()
    assert data["peft_type"] == "LORA" and data["inference_mode"] is True
    assert data["target_modules"] == ["q_proj", "v_proj"]
    back = LoraConfig.from_peft_dict(data)
    assert back.inference_mode is False
    assert (back.r, back.lora_alpha, back.bias, back.use_rslora, back.modules_to_save, back.lora_dropout) == (
        4, 8, "lora_only", True, ["lm_head"], 0.1)


def test_unknown_keys_from_newer_peft_are_ignored() -> None:
    data = LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    data.update(peft_version="9.9.9", some_future_option={"x": 1}, loftq_config={}, megatron_core="megatron.core")
    assert LoraConfig.from_peft_dict(data).target_modules == ["q_proj"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("lora_bias", True), ("layers_to_transform", [0]), ("trainable_token_indices", [1, 2])],
)
def test_features_that_change_the_weights_meaning_are_refused(key: str, value: object) -> None:
    data = LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    data[key] = value
    with pytest.raises(ConfigError, match=f"adapter uses {key}, which lorakit does not support"):
        LoraConfig.from_peft_dict(data)


def test_other_peft_types_are_refused() -> None:
    with pytest.raises(ConfigError, match="peft_type 'IA3' is not supported"):
        LoraConfig.from_peft_dict({"peft_type": "IA3"})
