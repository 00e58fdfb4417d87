"""Put adapters into a model: wrap the targeted layers, freeze the rest, count parameters."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import LoraConfig, replace
from lorakit.errors import ConfigError
from lorakit.lora import expert
from lorakit.lora.base_layer import parameter_count
from lorakit.lora.init import init_problem, mutates_base
from lorakit.lora.layer import LoraLinear, ModulesToSave
from lorakit.lora.loftq import original_weights
from lorakit.lora.targets import ALL_LINEAR, find_targets, inside_lora_layer, is_linear_like, module_to_save_matches, name_matches, resolve_all_linear


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def inject_adapter(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", adapter_dtype: torch.dtype | None = None
) -> LoraConfig:
    """Add adapter `adapter_name` to every module `config` targets; returns the config as peft stores it
    ("all-linear" expanded to layer names, `fan_in_fan_out` set from the adapted layers' layout).

    Raises:
        ConfigError: the targets or modules_to_save do not fit the model; the model is then left unchanged.
    """
    all_linear = config.target_modules == ALL_LINEAR
    if all_linear:
        config = replace(config, target_modules=resolve_all_linear(model))
    config = expert.with_expert_names_mapped(model, config, all_linear)  # transformers 4 expert names, as peft maps them
    # Every check runs before the first module is replaced, so a bad config never half-wraps the model.
    save_paths = _modules_to_save_paths(model, config)
    # peft never puts LoRA inside a module trained in full (a classifier head with its own linears)
    targets = find_targets(model, config) if config.target_modules or not config.target_parameters else []
    paths = [p for p in targets if not any(p == s or p.startswith(s + ".") for s in save_paths)]
    _check_adaptable(model, paths)
    parameters = expert.parameter_targets(model, config.target_parameters) if config.target_parameters else []
    expert.check_parameter_targets(model, config, parameters, paths)
    originals = original_weights(model, paths) if config.init_lora_weights == "loftq" else {}
    _check_base_kept(model, paths, config, rewrites=not originals)
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            _set_child(model, path, module)
        r, alpha = config.layer_rank_alpha(path)
        module.add_adapter(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, adapter_dtype,
                           use_dora=config.use_dora, init=config.init_lora_weights, loftq_config=config.loftq_config,
                           original=originals.get(path))
    expert.inject_parameters(model, config, parameters, adapter_name, config.layer_rank_alpha, adapter_dtype)
    for path in save_paths:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _set_child(model, path, module)
        module.add_adapter(adapter_name)
    if originals:  # LoftQ from the checkpoint left the NF4 base as it is: nothing to redo when the adapter loads
        config = replace(config, init_lora_weights=True)
    fan_in_fan_out = any(model.get_submodule(path).fan_in_fan_out for path in paths)
    return replace(config, fan_in_fan_out=fan_in_fan_out) if fan_in_fan_out != config.fan_in_fan_out else config


def _check_adaptable(model: nn.Module, paths: list[str]) -> None:
    wrong = [(p, m) for p in paths if not isinstance(m := model.get_submodule(p), LoraLinear) and not is_linear_like(m)]
    if wrong:
        path, module = wrong[0]
        raise ConfigError(
            [f"target {path!r} is a {type(module).__name__}; lorakit adapts Linear and Conv1D layers only"], "LoraConfig"
        )


def _check_base_kept(model: nn.Module, paths: list[str], config: LoraConfig, rewrites: bool = True) -> None:
    """PiSSA / OLoRA / LoftQ rewrite the base weights; on a layer that other adapters already use, that would
    silently change what every one of them computes (peft lets it happen). Also every layer's init_problem."""
    for path in paths:
        module = model.get_submodule(path)
        problem = init_problem(module.base_layer if isinstance(module, LoraLinear) else module, config.init_lora_weights, config.loftq_config)
        if problem:
            raise ConfigError([problem], "LoraConfig")
    rewritten = [(p, m.base_rewritten_by) for p in paths if isinstance(m := model.get_submodule(p), LoraLinear) and m.base_rewritten_by]
    if rewritten:
        path, (owner, init) = rewritten[0]
        raise ConfigError([f"the base weight of {path} is the residual adapter {owner!r} left (init_lora_weights {init!r}), "
                           "so no other adapter can share it; load this one on a fresh base"], "LoraConfig")
    if not (rewrites and mutates_base(config.init_lora_weights)):
        return
    shared = [p for p in paths if isinstance(m := model.get_submodule(p), LoraLinear) and m.lora_A]
    if shared:
        raise ConfigError([f"init_lora_weights {config.init_lora_weights!r} rewrites the base weight of {shared[0]}, "
                           "which other adapters use; give this adapter a base of its own, or convert it to a plain "
                           "LoRA adapter (save_pretrained with path_initial_model_for_weight_conversion)"], "LoraConfig")


def _modules_to_save_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules trained in full, already-wrapped ones included; empty when none are asked for."""
    if not config.modules_to_save:
        return []
    paths = [n for n, _ in model.named_modules() if n and not inside_lora_layer(n) and module_to_save_matches(config.modules_to_save, n)]
    if not paths:
        raise ConfigError([f"modules_to_save {config.modules_to_save!r} match no module of the model"], "LoraConfig")
    return paths


def mark_trainable(model: nn.Module, adapter_name: str, bias: str) -> None:
    """Freeze everything but the adapter's A/B, its modules_to_save copies and the biases `bias` selects."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            module.lora_A[adapter_name].requires_grad_(True)
            module.lora_B[adapter_name].requires_grad_(True)
            if module.is_dora(adapter_name):
                module.lora_magnitude_vector[adapter_name].requires_grad_(True)
            if bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(True)
    expert.set_trainable(model, adapter_name, True)
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias") and param.is_floating_point():
                param.requires_grad_(True)


def freeze_adapter(model: nn.Module, adapter_name: str) -> None:
    """Freeze the adapter's own weights (A, B, modules_to_save copies), as peft does in inference mode."""
    for module in model.modules():
        if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
            module.lora_A[adapter_name].requires_grad_(False)
            module.lora_B[adapter_name].requires_grad_(False)
            if module.is_dora(adapter_name):
                module.lora_magnitude_vector[adapter_name].requires_grad_(False)
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            module.modules_to_save[adapter_name].requires_grad_(False)
    expert.set_trainable(model, adapter_name, False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters as peft counts them: 4-bit weights count twice their packed bytes."""
    trainable = total = 0
    for param in model.parameters():
        count = parameter_count(param)
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
