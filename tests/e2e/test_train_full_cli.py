"""Full fine-tuning from the CLI on the default model (shortened): train --full, then the saved model
directory used as a plain base by `lorakit eval` and `lorakit generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli import main

pytestmark = pytest.mark.slow

TRAIN_EXAMPLES, EVAL_EXAMPLES = 48, 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    code = main(["train", "--full", "--task_train_examples", str(TRAIN_EXAMPLES), "--task_eval_examples", str(EVAL_EXAMPLES),
                 "--max_seq_len", "256", "--per_device_train_batch_size", "2", "--max_steps", "4", "--learning_rate", "5e-5",
                 "--warmup_steps", "1", "--logging_steps", "1", "--output_dir", str(out)])
    assert code == 0
    return out


def test_a_shortened_full_run_learns_the_task(trained: Path):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["finetune"] == "full" and summary["trainable_parameters"] > 100_000_000  # SmolLM2-135M, every weight
    before, after = summary["before"], summary["after"]
    assert after["eval_loss"] < before["eval_loss"]
    losses = [r["loss"] for r in map(json.loads, (trained / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]
    model = trained / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {p.name for p in model.iterdir()}
    assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"  # saved in the base's dtype
    assert 200e6 < summary["saved_bytes"] < 300e6  # 135M parameters in bf16, tied embeddings once
    assert not (trained / "adapter").exists()


def test_eval_of_the_saved_model_scores_what_the_run_scored(trained: Path, tmp_path: Path, capsys):
    from lorakit.tasks.order_json import train_eval_records

    _, held = train_eval_records(TRAIN_EXAMPLES, EVAL_EXAMPLES)
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in held))
    assert main(["eval", "--model", str(trained / "model"), "--data", str(data), "--max-new-tokens", "48"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("base"))
    summary = json.loads((trained / "summary.json").read_text())
    assert float(row[1].rstrip("%")) == pytest.approx(100 * summary["after"]["exact_match"], abs=0.05)


def test_generate_runs_on_the_saved_model(trained: Path, capsys):
    from lorakit.tasks.order_json import INSTRUCTION

    message = f"{INSTRUCTION}\n\nOn 5 March 2024, Maria Lopez bought three lamps at $45.50 apiece."
    assert main(["generate", "--model", str(trained / "model"), "--chat", message, "--max-new-tokens", "32"]) == 0
    assert "{" in capsys.readouterr().out  # the fine-tuned model answers with JSON
