"""`lorakit estimate` through the CLI: the full fine-tuning / LoRA / QLoRA table from a config.json alone
(the package itself is tested in tests/estimate/)."""

from __future__ import annotations

import json
import re

from lorakit.cli import main

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


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["estimate", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a local directory" in err


def test_targets_that_match_nothing_are_reported(tmp_path, capsys):
    directory = config_dir(tmp_path, **{**LLAMA_1B, "num_hidden_layers": 1})
    assert main(["estimate", str(directory), "--target-modules", "qproj"]) == 2
    assert re.search("closest existing: .*q_proj", capsys.readouterr().err)
