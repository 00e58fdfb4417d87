"""Fold adapters into the base weights and unwrap, leaving a plain transformers model."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora import expert
from lorakit.lora.inject import _set_child
from lorakit.lora.layer import LoraLinear, ModulesToSave
from lorakit.weights.dequant import dense_weight
from lorakit.weights.kinds import is_quantized


def merged_linear(layer: LoraLinear, names: list[str], safe: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """The base layer with `names` folded in, computed in fp32 and stored in `dtype` (default: the base's).

    A quantized base is dequantized and comes back as a dense nn.Linear; it is never re-quantized here."""
    base = layer.base_layer
    if layer.merged_adapters and any(layer.is_dora(n) for n in names + layer.merged_adapters):
        layer.unmerge()  # DoRA merges from the unmerged weight (LoraLinear.fold)
    weight, _ = layer.fold(dense_weight(base).float(), [n for n in names if n not in layer.merged_adapters])
    if safe and not torch.isfinite(weight).all():
        raise LorakitError(f"merging adapters {names} gives NaN or inf weights; the adapter is broken, retrain it")
    quantized = is_quantized(base.weight)
    if not quantized:
        target_dtype = dtype or base.weight.dtype
        with torch.no_grad():
            base.weight.data = weight.to(target_dtype)
            if base.bias is not None and dtype is not None:
                base.bias.data = base.bias.data.to(dtype)
        return base
    target_dtype = dtype or torch.bfloat16
    dense = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, dtype=target_dtype, device=weight.device)
    with torch.no_grad():
        dense.weight.copy_(weight.to(target_dtype))
        if base.bias is not None:
            dense.bias.copy_(base.bias.to(target_dtype))
    return dense


def check_finite_merge(model: nn.Module, adapter_names: list[str] | None = None) -> None:
    """safe_merge's check, run over every layer before the first one changes, so a broken adapter leaves
    the model as it was instead of half merged.

    Raises:
        LorakitError: folding the active (or named) adapters into some layer gives NaN or inf weights.
    """
    expert.check_finite(model, adapter_names)
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLinear):
            continue
        wanted = adapter_names if adapter_names is not None else layer.active_adapters
        names = [n for n in wanted if n in layer.lora_A and n not in layer.merged_adapters]
        if names and not torch.isfinite(layer.fold(dense_weight(layer.base_layer).float(), names)[0]).all():
            raise LorakitError(f"merging adapters {names} into {path} gives NaN or inf weights; the adapter is broken, retrain it")


def merge_and_unload(model: nn.Module, safe_merge: bool = False, adapter_names: list[str] | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge the active (or named) adapters into `model` in place and remove every LoRA wrapper."""
    if safe_merge:
        check_finite_merge(model, adapter_names)
    expert.unwrap_parameters(model, merge=True, adapter_names=adapter_names, dtype=dtype)
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            names = adapter_names if adapter_names is not None else module.active_adapters
            _set_child(model, path, merged_linear(module, [n for n in names if n in module.lora_A], safe_merge, dtype))
        elif isinstance(module, ModulesToSave):
            chosen = module.active_adapter if adapter_names is None else next((n for n in adapter_names if n in module.modules_to_save), None)
            _set_child(model, path, module.modules_to_save[chosen] if chosen else module.original_module)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the original model comes back."""
    expert.unwrap_parameters(model, merge=False)
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            module.unmerge()
            _set_child(model, path, module.base_layer)
        elif isinstance(module, ModulesToSave):
            _set_child(model, path, module.original_module)
    return model
