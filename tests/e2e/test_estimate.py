"""`lorakit estimate`: the full fine-tuning / LoRA / QLoRA table from a config.json alone."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lorakit.cli import main
from lorakit.estimate import estimate, nf4_bytes

LLAMA_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5, hidden_act="silu")


def config_dir(tmp_path, **values):
    """A directory holding nothing but config.json: estimate must not need weights."""
    (tmp_path / "config.json").write_text(json.dumps(values))
    return tmp_path


def test_cli_prints_the_three_columns_from_config_only(tmp_path, capsys):
    directory = config_dir(tmp_path, **LLAMA_1B)
    assert main(["estimate", str(directory), "--r", "16", "--seq-len", "256", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "1,100,048,384 parameters" in out  # TinyLlama-1.1B's count; LoRA: 22 x 16 x (4096 + 2304 + 2304 + 4096)
    for label in ("full fine-tuning", "LoRA (bf16 base)", "QLoRA (nf4 base)", "peak memory", "saved on disk", "nf4+dq", "int8"):
        assert label in out
    assert "| trainable parameters | 1,100,048,384 | 4,505,600 | 4,505,600 |" in out


def test_lora_count_matches_the_real_adapter(tmp_path, tiny_llama):
    from lorakit import LoraConfig, get_peft_model

    tiny_llama.config.save_pretrained(tmp_path)
    result = estimate(tmp_path, r=4, target_modules=["q_proj", "v_proj", "down_proj"], seq_len=32, batch=2)
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert result.lora_params == trainable and result.total_params == total - trainable


def test_weight_formats_and_ratios():
    assert nf4_bytes(4096 * 4096) / (2 * 4096 * 4096) < 0.26  # 4 bits + 1/64 byte of scales + a few constants
    assert nf4_bytes(64, double_quant=False) == 32 + 4 + 64


def test_meta_measured_activations_match_a_real_run(tiny_llama):
    """The saved-tensor bytes counted on meta tensors are the bytes a real bf16 run keeps."""
    from lorakit.config import LoraConfig
    from lorakit.estimate import measure_decoder, meta_model
    from lorakit.lora.targets import find_targets

    def measure(model, device):
        targets = [model.get_submodule(p) for p in find_targets(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))]
        return measure_decoder(model, 2, 16, targets, 4, device=device)

    on_meta = measure(meta_model(tiny_llama.config), "meta")
    on_cpu = measure(tiny_llama.to(torch.bfloat16).requires_grad_(False), "cpu")
    assert on_meta == on_cpu and on_meta[0][0] > 0


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["estimate", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a local directory" in err


def test_targets_that_match_nothing_are_reported(tmp_path, capsys):
    directory = config_dir(tmp_path, **{**LLAMA_1B, "num_hidden_layers": 1})
    assert main(["estimate", str(directory), "--target-modules", "qproj"]) == 2
    assert re.search("closest existing: .*q_proj", capsys.readouterr().err)
