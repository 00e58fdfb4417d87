"""`lorakit merge`'s choice of base, and its one-line refusal of a damaged adapter."""

from __future__ import annotations

import json

import pytest

from lorakit.commands.merge import base_for
from lorakit.errors import LorakitError
from tests.helpers import make_tiny_llama


def test_the_base_is_the_option_else_the_recorded_local_directory_else_the_default(tmp_path) -> None:
    base = tmp_path / "base"
    make_tiny_llama().save_pretrained(base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    assert base_for(str(adapter), "other") == "other"
    assert base_for(str(adapter), None) == str(base)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/on-the-hub"}))
    assert base_for(str(adapter), None) == "default"


def test_a_damaged_adapter_config_is_one_line_naming_the_file(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LorakitError, match="adapter_config.json is not valid JSON"):
        base_for(str(tmp_path), None)
