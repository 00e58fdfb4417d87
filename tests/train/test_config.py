"""`lorakit train` settings: one test per error message, all problems at once, nothing written on failure."""

import pytest

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.train.config import load_run_config


def problems_for(overrides=None, yaml_text=None, tmp_path=None):
    path = None
    if yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_run_config(path, overrides)
    return str(err.value)


@pytest.mark.parametrize("overrides, message", [
    ({"learning_rte": "1e-4"}, "unknown setting 'learning_rte' (did you mean 'learning_rate'?)"),
    ({"max_steps": "ten"}, "max_steps must be a number (got 'ten')"),
    ({"max_steps": "2.5"}, "max_steps must be a whole number"),
    ({"bf16": "maybe"}, "bf16 must be true or false"),
    ({"r": "0"}, "r must be a positive integer"),
    ({"lora_alpha": "-1"}, "lora_alpha must be > 0"),
    ({"lora_dropout": "1.5"}, "lora_dropout must be in [0, 1)"),
    ({"bias": "some"}, "bias must be one of none, all, lora_only"),
    ({"path": "/no/such/file.jsonl"}, "data path '/no/such/file.jsonl' does not exist"),
    ({"format": "xml"}, "format must be auto or one of"),
    ({"on_bad_record": "ignore"}, "on_bad_record must be one of"),
    ({"max_seq_len": "8"}, "max_seq_len must be >= 16"),
    ({"eval_fraction": "1"}, "eval_fraction must be in [0, 1)"),
    ({"per_device_train_batch_size": "0"}, "per_device_train_batch_size must be >= 1"),
    ({"gradient_accumulation_steps": "0"}, "gradient_accumulation_steps must be >= 1"),
    ({"max_steps": "0", "num_train_epochs": "0"}, "set num_train_epochs > 0 or max_steps > 0"),
    ({"learning_rate": "0"}, "learning_rate must be > 0"),
    ({"warmup_ratio": "1.5"}, "warmup_ratio must be in [0, 1)"),
    ({"lr_scheduler_type": "step"}, "lr_scheduler_type must be cosine, linear or constant"),
    ({"max_grad_norm": "-1"}, "max_grad_norm must be >= 0"),
    ({"save_steps": "-5"}, "save_steps must be >= 0"),
    ({"optim": "sgd"}, "optim must be one of"),
    ({"quantization": "nf3"}, "quantization must be one of"),
    ({"dtype": "int4"}, "model dtype must be one of float32, fp32, bfloat16"),
    ({"save_total_limit": "-1"}, "save_total_limit must be >= 0"),
    ({"eval_steps": "-1"}, "eval_steps must be >= 0"),
    ({"task_type": "TOKEN_CLS"}, "task_type 'TOKEN_CLS' is not supported by lorakit train yet; use CAUSAL_LM or SEQ_CLS"),
    ({"task_type": "CAUSAL"}, "task_type 'CAUSAL' is unknown"),
    ({"double_quant": "true", "quantization": "int8"}, "double_quant applies to nf4 / fp4 only"),
    ({"lora.max_steps": "3"}, "unknown setting 'lora.max_steps'"),
])
def test_each_error_message(overrides, message):
    assert message in problems_for(overrides)


def test_every_problem_is_reported_at_once():
    text = problems_for({"r": "0", "learning_rate": "0", "bogus": "1"})
    assert "r must be a positive integer" in text and "learning_rate must be > 0" in text and "unknown setting 'bogus'" in text


def test_yaml_errors(tmp_path):
    assert "is not valid YAML" in problems_for(yaml_text="train: [unclosed", tmp_path=tmp_path)
    assert "must hold a mapping" in problems_for(yaml_text="- a\n- b\n", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")


def test_yaml_sections_flat_keys_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  r: 8\n  target_modules: all-linear\ntrain:\n  max_steps: 50\nlearning_rate: 1.0e-3\n")
    config = load_run_config(path, {"max_steps": "7", "train.output_dir": str(tmp_path / "o")})
    assert config.lora.r == 8 and config.lora.target_modules == "all-linear"
    assert config.train.max_steps == 7 and config.train.learning_rate == 1e-3
    assert config.train.output_dir == str(tmp_path / "o")


def test_sections_are_the_library_config_types_with_training_defaults(tmp_path):
    from lorakit import LoraConfig, QuantConfig

    path = tmp_path / "run.yaml"
    # exclude_modules could not be set from YAML when the lora section re-declared LoraConfig's fields
    path.write_text("model:\n  name: default\n  quantization: none\nlora:\n  exclude_modules: [o_proj]\nquant:\n  compute_dtype: float32\n")
    config = load_run_config(path, {"modules_to_save": "lm_head,embed_tokens"})
    assert isinstance(config.lora, LoraConfig) and isinstance(config.quant, QuantConfig)
    assert config.lora.exclude_modules == ["o_proj"] and config.lora.modules_to_save == ["lm_head", "embed_tokens"]
    assert (config.lora.r, config.lora.lora_alpha, config.lora.task_type) == (16, 32, "CAUSAL_LM")
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.quant == QuantConfig(compute_dtype="float32")


def test_written_config_reads_back_the_same(tmp_path):
    import yaml

    config = load_run_config(None, {"r": "4", "exclude_modules": "o_proj", "save_total_limit": "2", "eval_steps": "5"})
    path = tmp_path / "lorakit_config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    assert load_run_config(path) == config


def test_cli_config_error_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "--output_dir", str(out), "--r", "0", "--learning_rate", "-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "r must be a positive integer" in err and "learning_rate must be > 0" in err
    assert not out.exists()


def test_cli_bad_data_exits_2_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text('{"instruction": "x", "output": ""}\n')
    out = tmp_path / "out"
    code = main(["train", "--path", str(data), "--output_dir", str(out)])
    assert code == 2
    assert "error" in capsys.readouterr().err
    assert not out.exists()


def test_train_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    from lorakit.train.config import SECTIONS, field_owner

    assert set(SECTIONS) == {"model", "quant", "lora", "data", "train"}
    for name in field_owner():  # every setting of every section, each with its help and default
        assert f"    {name} " in text, name
    assert "exclude_modules" in text and "save_total_limit" in text and "task_type" in text


def test_seq_cls_defaults_apply_unless_set():
    config = load_run_config(None, {"task_type": "SEQ_CLS", "learning_rate": "5e-4"})
    assert config.lora.target_modules == ["query", "value", "q_proj", "v_proj"] and config.lora.r == 8
    assert config.train.learning_rate == 5e-4 and config.train.per_device_train_batch_size == 16
    assert load_run_config(None, {}).lora.r == 16  # the causal defaults are untouched


def test_adapter_methods_from_yaml_and_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  use_dora: true\n  rank_pattern: {down_proj: 32}\n  alpha_pattern: {down_proj: 64}\n"
                    "train:\n  loraplus_lr_ratio: 16\n")
    config = load_run_config(path, {"init_lora_weights": "pissa_niter_4", "rank_pattern": '{"q_proj": 4}'})
    assert (config.lora.use_dora, config.lora.rank_pattern, config.lora.alpha_pattern) == (True, {"q_proj": 4}, {"down_proj": 64})
    assert (config.lora.init_lora_weights, config.train.loraplus_lr_ratio) == ("pissa_niter_4", 16.0)
    assert load_run_config(None, {"init_lora_weights": "false"}).lora.init_lora_weights is False
    with pytest.raises(ConfigError) as caught:
        load_run_config(None, {"init_lora_weights": "corda", "rank_pattern": "q_proj=4", "loraplus_lr_ratio": -1})
    assert len(caught.value.problems) == 3 and "rank_pattern must be a mapping" in str(caught.value)


def test_adapter_method_settings_survive_the_written_config(tmp_path):
    import yaml

    config = load_run_config(None, {"use_dora": True, "rank_pattern": '{"v_proj": 2}', "loraplus_lr_ratio": 4})
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_run_config(path) == config
