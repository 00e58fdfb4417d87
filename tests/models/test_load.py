"""models/load.py: local directories only, dtype names from lorakit.dtypes, quantized loads through quant/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.models.load import load_model, resolve_model_dir
from lorakit.weights.kinds import is_4bit
from tests.helpers import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    make_tiny_llama().save_pretrained(directory)
    return directory


def test_resolve_accepts_a_model_directory(tiny_dir: Path) -> None:
    assert resolve_model_dir(tiny_dir) == tiny_dir


def test_resolve_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="has no config.json"):
        resolve_model_dir(tmp_path)
    with pytest.raises(LorakitError, match="not a local directory and the Hugging Face hub is unreachable"):
        resolve_model_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("float32", torch.float32), (torch.float16, torch.float16)])
def test_dtype_names(tiny_dir: Path, name, dtype) -> None:
    assert {p.dtype for p in load_model(tiny_dir, dtype=name).parameters()} == {dtype}


def test_unknown_dtype_is_one_line(tiny_dir: Path) -> None:
    with pytest.raises(LorakitError, match="unknown dtype 'int4'; use one of"):
        load_model(tiny_dir, dtype="int4")


def test_quantization_loads_through_bitsandbytes(tiny_dir: Path) -> None:
    model = load_model(tiny_dir, quantization="nf4")
    assert is_4bit(model.model.layers[0].self_attn.q_proj.weight) and not is_4bit(model.lm_head.weight)
    plain = load_model(tiny_dir, quantization="none")
    assert not any(is_4bit(p) for p in plain.parameters())


def _tiny(config_class: str, model_class: str, directory: Path, **extra) -> Path:
    import transformers

    config = getattr(transformers, config_class)(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, **extra)
    getattr(transformers, model_class)(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family, config_class, model_class, expected", [
    ("llama", "LlamaConfig", "LlamaForCausalLM", "sdpa"),
    ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "sdpa"),
    ("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "eager"),  # softcapping lives in its eager function
])
def test_attention_is_chosen_per_model_class(tmp_path: Path, family, config_class, model_class, expected) -> None:
    directory = _tiny(config_class, model_class, tmp_path / family)
    assert load_model(directory).config._attn_implementation == expected
    assert load_model(directory, attn_implementation="eager").config._attn_implementation == "eager"  # asked for, kept


def test_the_shipped_names_and_gguf_files_are_named_when_nothing_matches(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="use 'default', 'gemma3-270m', a local model directory or a .gguf file"):
        resolve_model_dir("someone/some-model")
