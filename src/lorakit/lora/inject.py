"""Put adapters into a model: wrap the targeted layers, freeze the rest, count parameters."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.lora.layer import LoraLinear, ModulesToSave
from lorakit.lora.targets import ALL_LINEAR, find_targets, is_linear_like, name_matches, resolve_all_linear


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def inject_adapter(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", adapter_dtype: torch.dtype | None = None
) -> LoraConfig:
    """Add adapter `adapter_name` to every module `config` targets; returns the config with
    "all-linear" expanded to layer names (what peft stores)."""
    if config.target_modules == ALL_LINEAR:
        config = _with_targets(config, resolve_all_linear(model))
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        if not isinstance(module, LoraLinear):
            if not is_linear_like(module):
                raise ConfigError(
                    [f"target {path!r} is a {type(module).__name__}; lorakit adapts Linear and Conv1D layers only"], "LoraConfig"
                )
            module = LoraLinear(module, fan_in_fan_out=config.fan_in_fan_out)
            _set_child(model, path, module)
        module.add_adapter(adapter_name, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, adapter_dtype)
    _wrap_modules_to_save(model, config, adapter_name)
    return config


def _with_targets(config: LoraConfig, targets: list[str]) -> LoraConfig:
    from lorakit.config import replace

    return replace(config, target_modules=targets)


def _wrap_modules_to_save(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    if not config.modules_to_save:
        return
    paths = [n for n, _ in model.named_modules() if n and name_matches(config.modules_to_save, n) and ".original_module" not in n and ".modules_to_save" not in n]
    paths = [p for p in paths if not isinstance(model.get_submodule(p), ModulesToSave)] + [
        p for p, m in model.named_modules() if isinstance(m, ModulesToSave) and name_matches(config.modules_to_save, p)
    ]
    if not paths:
        raise ConfigError([f"modules_to_save {config.modules_to_save!r} match no module of the model"], "LoraConfig")
    for path in dict.fromkeys(paths):
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _set_child(model, path, module)
        module.add_adapter(adapter_name)


def mark_trainable(model: nn.Module, adapter_name: str, bias: str) -> None:
    """Freeze everything but the adapter's A/B, its modules_to_save copies and the biases `bias` selects."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            module.lora_A[adapter_name].requires_grad_(True)
            module.lora_B[adapter_name].requires_grad_(True)
            if bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias") and param.is_floating_point():
                param.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters as peft counts them: 4-bit weights count twice their packed bytes."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":
            count *= 2 * param.element_size()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
