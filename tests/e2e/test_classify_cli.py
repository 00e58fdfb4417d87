"""Classification from the CLI on the default encoder: train (shortened), classify, eval; the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "run"
    code = main(["train", "--task_type", "SEQ_CLS", "--task_train_examples", "160", "--task_eval_examples", "64",
                 "--max_steps", "30", "--learning_rate", "3e-3", "--warmup_steps", "2", "--logging_steps", "10", "--output_dir", str(out)])
    assert code == 0
    return out


def test_shortened_default_run_beats_the_untrained_head(trained: Path):
    summary = json.loads((trained / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert after["accuracy"] > before["accuracy"] + 0.1
    assert after["eval_loss"] < before["eval_loss"]
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    assert config["target_modules"] == ["query", "value"]
    assert json.loads((trained / "adapter" / "labels.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}


def test_classify_prints_labels_with_probabilities(trained: Path, capsys):
    assert main(["classify", "--adapter", str(trained / "adapter"), "The kettle works perfectly and is quiet. Five stars.",
                 "The drill broke within a week and feels cheap. Returning it."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("positive\t") and lines[1].startswith("negative\t")
    probs = [float(x) for x in lines[0].split("\t")[1].split()[1::2]]
    assert abs(sum(probs) - 1) < 1e-3


def test_eval_reports_accuracy_and_macro_f1(trained: Path, tmp_path, capsys):
    from lorakit.tasks.sentiment import records

    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(40, seed=7)))
    assert main(["eval", str(trained / "adapter"), "--data", str(data), "--base", "--predictions", str(tmp_path / "p.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro-F1" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert float(rows["adapter0"][1].rstrip("%")) > float(rows["base"][1].rstrip("%"))
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 80


def test_eval_refuses_unknown_labels_with_the_line(trained: Path, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "fine", "label": "positive"}) + "\n" + json.dumps({"text": "meh", "label": "neutral"}) + "\n")
    assert main(["eval", str(trained / "adapter"), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl:2: unknown label 'neutral'" in err


def test_bad_training_labels_are_one_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "ok", "label": "a"}) + "\n" + json.dumps({"text": "no label"}) + "\n")
    assert main(["train", "--task_type", "SEQ_CLS", "--path", str(data), "--on_bad_record", "error", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.jsonl:2: missing label" in err


def test_num_labels_disagreeing_with_the_data_is_one_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(10)))
    assert main(["train", "--task_type", "SEQ_CLS", "--path", str(data), "--num_labels", "3", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_labels is 3 but the data has 2 labels" in err


def test_encoder_asked_to_generate_is_one_line(capsys):
    from lorakit.models.classifier import default_encoder_dir

    assert main(["generate", "--model", str(default_encoder_dir()), "--prompt", "Hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is an encoder (bert" in err and "cannot generate" in err


def test_generation_adapter_and_classifier_are_not_mixed_in_one_eval(trained: Path, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "x", "label": "positive"}) + "\n")
    other = tmp_path / "gen"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "target_modules": ["q_proj"]}))
    assert main(["eval", str(trained / "adapter"), str(other), "--data", str(data)]) == 2
    assert "evaluate them separately" in capsys.readouterr().err
