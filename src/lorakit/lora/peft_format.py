"""peft's adapter files: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.lora_A.weight`: lorakit's own state-dict keys with the adapter
name removed and peft's prefix added, nothing more. Everything that reads or writes these files (a
model's save_pretrained / load_adapter, `lorakit combine` on bare factors, checkpoints) goes through here."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.io import atomic_directory, file_kind
from lorakit.lora.conversion import to_original_base
from lorakit.lora.expert import ParamLora
from lorakit.lora.layer import LoraLinear, ModulesToSave

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FACTOR_PARTS = ("lora_A", "lora_B")
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m: `<path>.lora_magnitude_vector` in the file, no `.weight`


def adapter_state_dict(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's key names (adapter name stripped, prefix added)."""
    state: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            state[f"{path}.lora_A.weight"] = module.lora_A[adapter_name].weight
            state[f"{path}.lora_B.weight"] = module.lora_B[adapter_name].weight
            if module.is_dora(adapter_name):
                state[f"{path}.{MAGNITUDE}"] = module.lora_magnitude_vector[adapter_name]
            if bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                state[f"{path}.base_layer.bias"] = module.base_layer.bias
        elif isinstance(module, ParamLora) and adapter_name in module.lora_A:  # peft's ParamWrapper keys
            state[f"{path}.lora_A.weight"] = module.lora_A[adapter_name].weight
            state[f"{path}.lora_B.weight"] = module.lora_B[adapter_name].weight
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for key, value in module.modules_to_save[adapter_name].state_dict().items():
                state[f"{path}.{key}"] = value
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias") and ".modules_to_save." not in name and ".original_module." not in name:
                state[name] = param
    return {PREFIX + k: v.detach().contiguous() for k, v in state.items()}


def factors_state_dict(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Bare (A, B) factors by module path under peft's key names: an adapter without a model."""
    tensors = {}
    for path, (lora_a, lora_b) in factors.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = lora_b.contiguous()
    return tensors


def save_adapter(model: nn.Module, config: LoraConfig, directory: str | os.PathLike, adapter_name: str = "default",
                 initial: str | os.PathLike | None = None) -> Path:
    """Write the model's adapter atomically, keeping the directory's other files (see write_adapter_files).
    With `initial` (the directory of a PiSSA / OLoRA adapter saved right after its initialisation), write it
    converted to a plain LoRA adapter of the original base instead (lora/conversion.py, peft's
    path_initial_model_for_weight_conversion)."""
    tensors = adapter_state_dict(model, adapter_name, config.bias)
    if initial is not None:
        config, tensors = to_original_base(config, tensors, read_adapter_weights(initial), initial)
    return write_adapter_files(directory, config, tensors, keep_other_files=True)


def write_adapter_files(directory: str | os.PathLike, config: LoraConfig, tensors: dict[str, torch.Tensor],
                        keep_other_files: bool = True) -> Path:
    """Write adapter_config.json and adapter_model.safetensors atomically: a crash leaves the previous
    directory (or nothing) in place. `keep_other_files` False replaces the directory's whole contents."""
    tensors = _untie(tensors)
    with atomic_directory(directory) as staging:
        if keep_other_files:
            _carry_over(Path(directory), staging)
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n")
    return Path(directory)


def _carry_over(old: Path, staging: Path) -> None:
    """Keep everything else the directory holds (a tokenizer saved beside the adapter, other adapters'
    sub-directories): peft's save_pretrained writes only its two files, so users rely on that.

    Hard links make this cheap; the swap of the whole directory stays atomic."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if entry.name in (CONFIG_NAME, WEIGHTS_NAME):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, staging / entry.name)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, target)


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; copy the second and later sharers."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """The adapter's LoraConfig from its adapter_config.json.

    Raises:
        LorakitError: the file is missing, is not JSON, or does not hold a JSON object.
    """
    path = Path(directory) / CONFIG_NAME
    raw = _read_regular_file(path, missing=f"no {CONFIG_NAME} in {directory}; point at a directory written by save_pretrained")
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8 text
        raise LorakitError(f"{path} is not valid JSON ({_one_line(err)}); re-save or re-download the adapter") from err
    if not isinstance(data, dict):
        raise LorakitError(f"{path} holds a JSON {type(data).__name__}, not an object of LoRA settings; re-save or re-download the adapter")
    return LoraConfig.from_peft_dict(data)


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors, under peft's key names.

    Raises:
        LorakitError: the file is missing (or only a pickled adapter_model.bin is there), or it is not
            a readable safetensors file (a damaged header, a truncated download).
    """
    path = Path(directory) / WEIGHTS_NAME
    hint = " (lorakit never unpickles adapter_model.bin; convert it to safetensors)" if (Path(directory) / "adapter_model.bin").exists() else ""
    raw = _read_regular_file(path, missing=f"no {WEIGHTS_NAME} in {directory}{hint}")
    try:
        return dict(sorted(load(raw).items()))  # by key, as load_file (safe_open) gives them
    except SafetensorError as err:
        raise LorakitError(f"{path} is not a valid safetensors file ({_one_line(err)}); re-save or re-download the adapter") from err


def split_factors(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """A file's tensors as (A, B) factors by module path, plus the keys that are no LoRA factor (a trained
    bias, a modules_to_save copy), which only a model can take.

    Raises:
        LorakitError: a module has only one of lora_A / lora_B (`source` names the file in the message).
    """
    halves: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, value in tensors.items():
        path, _, part = key.removeprefix(PREFIX).removesuffix(".weight").rpartition(".")
        if not key.startswith(PREFIX) or part not in FACTOR_PARTS or not key.endswith(".weight"):
            others.append(key)
        else:
            halves.setdefault(path, {})[part] = value
    lonely = [p for p, h in halves.items() if len(h) != 2]
    if lonely:
        raise LorakitError(f"{source} has only one of lora_A / lora_B for {lonely[0]}; re-save the adapter")
    return {p: (h["lora_A"], h["lora_B"]) for p, h in halves.items()}, others


def _read_regular_file(path: Path, missing: str) -> bytes:
    """The bytes of `path`, which must be a regular file (a symlink to one is followed).

    Opening a FIFO waits for a writer, forever if none comes, and a device can stream without end, so
    anything else is refused: by stat before opening, and again by fstat on a descriptor opened
    non-blocking, in case the path was swapped for a FIFO in between (the open then returns at once).

    Raises:
        LorakitError: `missing` if there is no such file; "... is not a regular file" otherwise.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise LorakitError(missing) from None
    except OSError as err:
        if err.errno != errno.ENXIO:  # ENXIO: a socket, which open() cannot read
            raise
        raise _not_regular(path, stat.S_IFSOCK) from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        return file.read()


def _not_regular(path: Path, mode: int) -> LorakitError:
    return LorakitError(f"{path} is not a regular file ({file_kind(mode)}); replace it with the file save_pretrained wrote")


def _one_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def to_model_keys(tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Map peft file keys to this model's parameter names, inserting the adapter name."""
    wrappers = {p for p, m in model.named_modules() if isinstance(m, ModulesToSave)}
    mapped = {}
    for key, value in tensors.items():
        key = key.removeprefix(PREFIX)
        for part in FACTOR_PARTS:
            if f".{part}." in key:
                key = key.replace(f".{part}.", f".{part}.{adapter_name}.")
        if key.endswith(f".{MAGNITUDE}"):
            key = f"{key}.{adapter_name}"
        owner = next((w for w in wrappers if key.startswith(w + ".")), None)
        if owner is not None:
            key = f"{owner}.modules_to_save.{adapter_name}.{key[len(owner) + 1:]}"
        mapped[key] = value
    return mapped


@torch.no_grad()
def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Copy the file's tensors into the injected adapter; refuse names or shapes that do not fit."""
    params = dict(model.named_parameters())
    mapped = to_model_keys(tensors, model, adapter_name)
    missing = [k for k in mapped if k not in params]
    wrong = [f"{k} is {tuple(v.shape)} in the file but {tuple(params[k].shape)} in the model" for k, v in mapped.items() if k in params and params[k].shape != v.shape]
    expected = [k for k in params if f".lora_A.{adapter_name}." in k or f".lora_B.{adapter_name}." in k
                or k.endswith(f".{MAGNITUDE}.{adapter_name}")]
    absent = [k for k in expected if k not in mapped]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors name modules the base model lacks (e.g. {missing[0]})")
    if wrong:
        problems.append(f"{len(wrong)} tensors have the wrong shape (e.g. {wrong[0]})")
    if absent:
        problems.append(f"{len(absent)} adapter tensors are missing from the file (e.g. {absent[0]})")
    if problems:
        raise LorakitError("adapter does not fit this base model: " + "; ".join(problems) + "; load it on the base model it was trained on")
    for key, value in mapped.items():
        params[key].copy_(value.to(params[key].dtype))
