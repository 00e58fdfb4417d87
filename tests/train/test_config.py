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
    ({"dtype": "int4"}, "model dtype must be bfloat16 or float32"),
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
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "lora_alpha", "target_modules", "max_seq_len", "quantization"):
        assert name in text
