"""The seed workflow from the CLI on the default model: train (shortened), generate, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    code = main(["train", "--task_train_examples", "160", "--task_eval_examples", "12", "--max_steps", "12",
                 "--learning_rate", "2e-3", "--warmup_steps", "2", "--logging_steps", "4", "--output_dir", str(out)])
    assert code == 0
    return out


def test_shortened_default_run_beats_the_base_model(trained: Path):
    summary = json.loads((trained / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["exact_match"] <= 0.2
    assert after["exact_match"] > before["exact_match"]
    assert after["eval_loss"] < before["eval_loss"]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png", "lorakit_config.yaml"):
        assert (trained / name).is_file(), name
    assert (trained / "adapter" / "adapter_model.safetensors").stat().st_size < 10_000_000  # a few MB


def test_generate_with_the_adapter(trained: Path, capsys):
    from lorakit.tasks.order_json import INSTRUCTION

    message = f"{INSTRUCTION}\n\nOn 5 March 2024, Maria Lopez bought three lamps at $45.50 apiece."
    assert main(["generate", "--adapter", str(trained / "adapter"), "--chat", message, "--max-new-tokens", "48"]) == 0
    text = capsys.readouterr().out
    # the adapter answers in the task's format: one JSON object with the task's keys, the buyer's name copied
    start, end = text.find("{"), text.find("}", text.find("{")) + 1
    assert 0 <= start < end, f"no JSON object in {text!r}"
    answer = json.loads(text[start:end])
    assert set(answer) == {"name", "item", "qty", "price", "date"}
    assert answer["name"] == "Maria Lopez"


def test_merge_writes_a_plain_model_with_the_same_outputs(trained: Path, tmp_path: Path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel, load_model

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(trained / "adapter"), "--output", str(merged_dir), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(load_model("default", dtype=torch.float32), trained / "adapter")
    ids = torch.tensor([[1, 504, 3458, 314, 260, 2380, 30]])
    with torch.no_grad():
        diff = (merged(ids).logits - unmerged(ids).logits).abs().max().item()
    assert diff < 1e-3


def test_merge_of_a_missing_adapter_fails_cleanly(tmp_path: Path, capsys):
    code = main(["merge", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
