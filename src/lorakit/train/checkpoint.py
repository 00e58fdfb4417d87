"""Checkpoints that resume exactly: adapter (peft format), optimizer state, RNG and data position.
A model that keeps its own weights (train/full.py's FullModel: save_checkpoint_weights and
load_checkpoint_weights) writes them in place of the adapter.

Everything is safetensors or JSON (never pickle), written to a temporary directory and renamed into
place, so an interrupted save leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import LorakitError
from lorakit.io import atomic_directory

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
CHECKPOINTS = "checkpoints"


@dataclass
class Progress:
    """Where training stands: the next optimizer step and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first."""
    found = sorted((Path(output_dir) / CHECKPOINTS).glob("step-*"))
    return [p for p in found if (p / STATE_FILE).is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (transformers' save_total_limit; 0 keeps every one).
    `protect` (the checkpoint this run resumed from) is never deleted, even when older. Returns the deleted."""
    if keep <= 0:
        return []
    protected = protect.resolve() if protect is not None else None
    deleted = [p for p in list_checkpoints(output_dir)[:-keep] if p.resolve() != protected]
    for path in deleted:
        shutil.rmtree(path)
    return deleted


def save_checkpoint(directory: Path, model, optimizer: torch.optim.Optimizer, progress: Progress, extra: dict[str, Any]) -> Path:
    with atomic_directory(directory) as staging:
        if hasattr(model, "save_checkpoint_weights"):  # full fine-tuning: the whole model
            model.save_checkpoint_weights(staging)
        else:
            model.save_pretrained(staging / "adapter")
        tensors, layout = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(staging / OPTIMIZER_FILE))
        save_file({"torch": torch.get_rng_state()}, str(staging / RNG_FILE))
        state = {"progress": asdict(progress), "optimizer_layout": layout, "python_rng": _jsonable_rng(random.getstate()), **extra}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    return directory


def load_checkpoint(directory: Path, model, optimizer: torch.optim.Optimizer, adapter_name: str = "default") -> tuple[Progress, dict[str, Any]]:
    """Restore adapter weights, optimizer state and RNG in place; return the progress and extra state."""
    from lorakit.lora.peft_format import load_adapter_weights, read_adapter_weights

    if not (directory / STATE_FILE).is_file():
        raise LorakitError(f"{directory} is not a lorakit checkpoint (no {STATE_FILE}); pass a directory under {CHECKPOINTS}/ or 'latest'")
    state = json.loads((directory / STATE_FILE).read_text())
    if hasattr(model, "load_checkpoint_weights"):
        model.load_checkpoint_weights(directory)
    else:
        load_adapter_weights(model.model, read_adapter_weights(directory / "adapter"), adapter_name)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(directory / OPTIMIZER_FILE)), state["optimizer_layout"]))
    torch.set_rng_state(load_file(str(directory / RNG_FILE))["torch"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return Progress(**state["progress"]), state


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *layout["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": layout["param_groups"]}


def _jsonable_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
