"""Which modules a `LoraConfig` adapts, with peft's matching rules."""

from __future__ import annotations

import difflib
import re

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.lora.layer import LoraLinear

ALL_LINEAR = "all-linear"


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def name_matches(pattern: list[str] | str, name: str) -> bool:
    """peft's rule: a string is a regex full-matched against the path; a list holds exact paths or dotted suffixes."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return name in pattern or any(name.endswith(f".{p}") for p in pattern)


def module_to_save_matches(names: list[str] | str, path: str) -> bool:
    """peft's modules_to_save rule (utils.other._set_trainable): a path that ends with a listed name as
    a string, so "classifier" also takes DistilBERT's "pre_classifier", the new first layer of its head.
    A string is a regex, as for targets."""
    if isinstance(names, str):
        return name_matches(names, path)
    return any(path.endswith(n) for n in names)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s), which "all-linear" leaves alone."""
    heads = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            heads.add(name)
    # by peft's modules_to_save rule (a path ending in the name): a classifier's whole new head, DistilBERT's
    # pre_classifier too, is trained in full, and LoRA on it would make peft refuse the adapter
    return heads | {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head" or module_to_save_matches(["score", "classifier"], n)}


def linear_paths(model: nn.Module) -> list[str]:
    """Paths of the model's linear layers. A layer that already carries LoRA counts under its own path:
    its inner `base_layer` and `lora_A.<name>` linears are not layers of the model."""
    return [
        name
        for name, module in model.named_modules()
        if (is_linear_like(module) or isinstance(module, LoraLinear)) and not inside_lora_layer(name)
    ]


def resolve_all_linear(model: nn.Module) -> list[str]:
    """The leaf names of every linear layer but the output head, as peft expands "all-linear"."""
    heads = output_head_names(model)
    return sorted({name.rsplit(".", 1)[-1] for name in linear_paths(model) if name not in heads})


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules `config` adapts; raises ConfigError when the targets match nothing."""
    targets = config.target_modules
    if targets is None:
        raise ConfigError(["target_modules is not set; name the layers to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'"], "LoraConfig")
    if targets == ALL_LINEAR:
        targets = resolve_all_linear(model)
    names = [n for n, _ in model.named_modules() if n and not inside_lora_layer(n)]
    matched = [n for n in names if name_matches(targets, n)]
    if not matched:
        raise ConfigError([_no_match_message(model, targets)], "LoraConfig")
    excluded = config.exclude_modules
    chosen = [n for n in matched if not (excluded and name_matches(excluded, n))]
    if not chosen:
        raise ConfigError(
            [f"exclude_modules {excluded!r} exclude all {len(matched)} modules target_modules {targets!r} match; narrow exclude_modules"],
            "LoraConfig",
        )
    return chosen


def inside_lora_layer(name: str) -> bool:
    """True for the parts lorakit adds inside a wrapped layer (base_layer, lora_A, ...), which are never targets."""
    parts = name.split(".")
    return any(p in ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector", "base_layer", "original_module", "modules_to_save") for p in parts)


def _no_match_message(model: nn.Module, targets: list[str] | str) -> str:
    linear_leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_paths(model)})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], linear_leaves, n=3, cutoff=0.4)})
    hint = f"closest existing: {', '.join(close)}" if close else f"linear layers in this model: {', '.join(linear_leaves[:12])}"
    return f"target_modules {targets!r} match no module of the model ({hint})"
