"""Checkpoint format: peft adapter + safetensors optimizer and RNG + JSON state, no pickle, atomic; pruning."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, get_peft_model
from lorakit.errors import LorakitError
from lorakit.train.checkpoint import (
    OPTIMIZER_FILE, RNG_FILE, STATE_FILE, Progress, checkpoint_dir, latest_checkpoint, list_checkpoints, load_checkpoint,
    prune_checkpoints, save_checkpoint,
)
from tests.helpers import make_tiny_llama, randomize_lora_b


def _trained():
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    randomize_lora_b(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=torch.randint(0, 128, (2, 8))).logits.sum().backward()
    optimizer.step()
    return model, optimizer


def test_files_are_safetensors_and_json_and_round_trip(tmp_path):
    model, optimizer = _trained()
    progress = Progress(step=7, epoch=1, batch_in_epoch=3, tokens_seen=999)
    path = save_checkpoint(checkpoint_dir(tmp_path, 7), model, optimizer, progress, {"total_steps": 10})
    assert path.name == "step-000007"
    assert sorted(p.name for p in path.iterdir()) == sorted(["adapter", OPTIMIZER_FILE, RNG_FILE, STATE_FILE])
    assert (path / "adapter" / "adapter_model.safetensors").is_file() and (path / "adapter" / "adapter_config.json").is_file()
    state = json.loads((path / STATE_FILE).read_text())
    assert state["progress"] == {"step": 7, "epoch": 1, "batch_in_epoch": 3, "tokens_seen": 999} and state["total_steps"] == 10
    assert set(load_file(str(path / OPTIMIZER_FILE))) == {f"{i}.{k}" for i in range(4) for k in ("exp_avg", "exp_avg_sq", "step")}
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))

    expected_rng, expected_py = torch.rand(3), random.random()
    fresh = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(999)
    got_progress, extra = load_checkpoint(path, fresh, fresh_opt)
    assert got_progress == progress and extra["total_steps"] == 10
    torch.testing.assert_close(torch.rand(3), expected_rng)  # RNG restored to the moment of saving
    assert random.random() == expected_py
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        if "lora_" in name:
            torch.testing.assert_close(a, b)
    saved, loaded = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    for index in saved:
        torch.testing.assert_close(saved[index]["exp_avg"], loaded[index]["exp_avg"])


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    model, optimizer = _trained()
    with pytest.raises(LorakitError, match="is not a lorakit checkpoint"):
        load_checkpoint(tmp_path, model, optimizer)


def test_latest_and_pruning(tmp_path):
    for step in (2, 4, 6, 8):
        (checkpoint_dir(tmp_path, step)).mkdir(parents=True)
        (checkpoint_dir(tmp_path, step) / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoints" / "step-000010").mkdir()  # incomplete: no state file
    assert latest_checkpoint(tmp_path).name == "step-000008"
    assert prune_checkpoints(tmp_path, 0) == []
    deleted = prune_checkpoints(tmp_path, 2, protect=checkpoint_dir(tmp_path, 2))
    assert [p.name for p in deleted] == ["step-000004"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000006", "step-000008"]
