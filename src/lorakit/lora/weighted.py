"""`add_weighted_adapter` on a LoraModel: its adapters read out as factors, combined by lora/arithmetic.py's
pure functions, and the result injected as a new adapter. Every check runs before the model changes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.lora.arithmetic import AdapterFactors, combine, plan
from lorakit.lora.layer import LoraLinear
from lorakit.lora.routing import require_known
from lorakit.lora.targets import find_targets

if TYPE_CHECKING:  # model.py imports this module: the type only, no import circle
    from lorakit.lora.model import LoraModel


def _lora_layers(model: LoraModel) -> list[tuple[str, LoraLinear]]:
    return [(path, m) for path, m in model.model.named_modules() if isinstance(m, LoraLinear)]


def factors_of(model: LoraModel, adapter_name: str) -> AdapterFactors:
    """The factors of one of the model's adapters (detached views, not copies)."""
    require_known([adapter_name], model.peft_config)
    factors = {path: (m.lora_A[adapter_name].weight.detach(), m.lora_B[adapter_name].weight.detach())
               for path, m in _lora_layers(model) if adapter_name in m.lora_A}
    return AdapterFactors(model.peft_config[adapter_name], factors, name=adapter_name)


def _check_modules_to_save(model: LoraModel, adapters: list[str]) -> None:
    """peft refuses two adapters with their own copy of the same module: full copies cannot be weighted."""
    for path, module in model.model.named_modules():
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, torch.nn.ModuleDict) and sum(name in copies for name in set(adapters)) > 1:
            holders = ", ".join(n for n in dict.fromkeys(adapters) if n in copies)
            raise LorakitError(f"adapters {holders} each train their own copy of {path} (modules_to_save), which cannot be weighted; combine adapters with at most one such copy per module")


@torch.no_grad()
def add_weighted_adapter(model: LoraModel, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total", generator: torch.Generator | None = None) -> None:
    """peft's `PeftModel.add_weighted_adapter`: add `adapter_name`, a weighted combination of `adapters`.

    The new adapter is frozen and not activated (call set_adapter). Unlike peft, an existing
    `adapter_name` is an error rather than a silent no-op. See arithmetic.combine for the arguments.

    Raises:
        LorakitError: invalid arguments or adapters that cannot be combined; the model is then unchanged.
    """
    if adapter_name in model.peft_config:
        raise LorakitError(f"adapter {adapter_name!r} already exists; pick another adapter_name or delete_adapter() it first")
    sources = [factors_of(model, name) for name in adapters]
    _check_modules_to_save(model, adapters)
    order = [path for path, m in _lora_layers(model) if any(name in m.lora_A for name in adapters)]
    options = dict(svd_rank=svd_rank, svd_clamp=svd_clamp, svd_driver=svd_driver, density=density,
                   majority_sign_method=majority_sign_method, modules=order)
    _, config, _ = plan(sources, weights, combination_type, **options)
    _check_targets(model, config, order, adapters[0])
    # Inject first, as peft does: the new layers' initialisation draws from torch's generator, so DARE's
    # drops that follow see the same random stream as in peft.
    model.add_adapter(adapter_name, config)
    try:
        combined = combine(sources, weights, combination_type, svd_full_matrices=svd_full_matrices, generator=generator, **options)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
    layers = dict(_lora_layers(model))
    for path, (lora_a, lora_b) in combined.factors.items():
        layer = layers[path]
        for table, value in ((layer.lora_A, lora_a), (layer.lora_B, lora_b)):
            table[adapter_name].weight.copy_(value)
            table[adapter_name].weight.requires_grad_(False)


def _check_targets(model: LoraModel, config: LoraConfig, order: list[str], first: str) -> None:
    """The combined config (every input's targets, the first input's exclude_modules) must adapt exactly the
    layers the inputs adapt; peft would silently drop an input's layer or crash on a layer none has."""
    injected = find_targets(model.model, config)
    if set(injected) != set(order):
        odd = sorted(set(injected) ^ set(order))[0]
        raise LorakitError(f"the combined config (targets of all adapters, exclude_modules of {first!r}) would {'adapt' if odd in injected else 'skip'} {odd}, "
                           "unlike the inputs; give the adapters the same exclude_modules")
