"""`ParamLora`: LoRA on one `nn.Parameter` of a module (peft's `target_parameters`, its ParamWrapper).

What it is for: MoE experts that transformers stores as fused 3-D parameters (Mixtral's and Qwen3-MoE's
`experts.gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I); gpt-oss's (E, H, 2I) and (E, I, H),
`is_transposed`), and 2-D ones such as a router's `gate.weight`. Each expert e gets its own rank-r pair,
stored as peft stores them so the files are peft's:

    lora_A: (r * E, in)  rows e * r + k          -> A_e = lora_A.view(E, r, in)
    lora_B: (out, r * E) columns k * E + e       -> B_e = lora_B.view(out, r, E)[:, :, e]
    delta_e = scaling * B_e A_e, laid out as the parameter stores expert e ((out, in), or (in, out) when
    transposed)

The module's own forward runs on W + delta (peft folds the same way), so any experts implementation
transformers picks (eager, grouped_mm, batched_mm) sees adapted weights. Several parameters of one module
nest, the first registered innermost (`experts.base_layer` holds gate_up_proj's factors, `experts` down_proj's),
exactly peft's state-dict keys. No dropout: x cannot be factored out of a parameter (peft refuses it too).

Mixed batches (a Routing from lora/routing.routed): lora/expert_routing.py gives each row its own
adapters, per token through transformers' experts modules, by groups of rows elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.lora.expert_routing import routed_call
from lorakit.lora.layer import layers_disabled
from lorakit.lora.routing import current_routing

LORA_PARTS = ("lora_A", "lora_B", "lora_dropout", "modules_to_save", "original_module")
PARAMETER_INITS = (True, False, "gaussian")  # peft's inits that need no base weight (its others fail on experts)


class ParamLora(nn.Module):
    """One parameter of `base_layer` (a module, or another ParamLora around it) with named adapters."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        shape = self.parameter().shape
        if len(shape) not in (2, 3):
            raise ConfigError([f"target_parameters {parameter_name!r} is {len(shape)}-D; lorakit (like peft) adapts 2-D and 3-D parameters"], "LoraConfig")
        # peft's reading of the layout: a 3-D stack is (E, out, in) unless the module says `is_transposed`
        self.transposed = len(shape) == 3 and bool(getattr(self.real_module, "is_transposed", False))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        self.out_features, self.in_features = (shape[-1], shape[-2]) if self.transposed else (shape[-2], shape[-1])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped module (`num_experts`, `act_fn`, ...) read through, as peft's do."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")  # none yet while copying or unpickling
            if base is None:
                raise
            return getattr(base, name)

    @property
    def real_module(self) -> nn.Module:
        """The module that owns the parameter, under every nested ParamLora."""
        module = self.base_layer
        while isinstance(module, ParamLora):
            module = module.base_layer
        return module

    def parameter(self) -> torch.Tensor:
        return self.real_module._parameters[self.parameter_name]

    # --- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, lora_alpha: float, use_rslora: bool = False, dtype: torch.dtype | None = None,
                    init: bool | str = True) -> None:
        """`init` as peft's init_lora_weights: True (A Kaiming, B zero: a no-op), "gaussian" (A normal with
        std 1 / r, B zero) or False (both as nn.Linear initializes them: not a no-op)."""
        device = self.parameter().device
        experts = self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, r * experts, bias=False, device=device, dtype=dtype or torch.float32)
        self.lora_B[name] = nn.Linear(r * experts, self.out_features, bias=False, device=device, dtype=dtype or torch.float32)
        if init is not False:
            if init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
        self.r[name] = r
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.lora_A[name], self.lora_B[name], self.r[name], self.scaling[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        if self.merged_adapters and set(names) != set(self.merged_adapters):
            self.unmerge()
        self.active_adapters = list(names)

    # --- the delta ----------------------------------------------------------------------------
    def factors(self, name: str, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs), batched by expert, with weight * scaling * lhs @ rhs = the delta in the parameter's
        layout: (E, out, r) @ (E, r, in), or (E, in, r) @ (E, r, out) when transposed (E = 1 for 2-D)."""
        experts, r = self.num_experts, self.r[name]
        a = self.lora_A[name].weight.view(experts, r, self.in_features)  # (E, r, in)
        b = self.lora_B[name].weight.view(self.out_features, r, experts).permute(2, 0, 1)  # (E, out, r)
        b = b * (weight * self.scaling[name])
        return (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A per expert in fp32, shaped like the parameter. Every merge path uses this."""
        lhs, rhs = self.factors(name)
        delta = torch.bmm(lhs.float(), rhs.float())
        return delta.view(self.parameter().shape)

    def adapted(self, mix: dict[str, float]) -> torch.Tensor | None:
        """The parameter with `mix` ({adapter: weight}) added, in its dtype: one baddbmm over the adapters'
        factors side by side; None when no adapter of the mix is here (the parameter applies as it is)."""
        names = [n for n in mix if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return None
        param = self.parameter()
        pairs = [self.factors(n, mix[n]) for n in names]
        lhs = torch.cat([p[0] for p in pairs], dim=2).to(param.dtype)
        rhs = torch.cat([p[1] for p in pairs], dim=1).to(param.dtype)
        stack = param.view(self.num_experts, *param.shape[-2:])
        with torch.autocast(param.device.type, enabled=False):  # the result must keep the parameter's dtype
            return torch.baddbmm(stack, lhs, rhs).view(param.shape)

    # --- merging ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        names = [n for n in (names or self.active_adapters) if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return
        param = self.parameter()
        merged = param.float() + sum(self.delta_weight(n) for n in names)
        if safe and not torch.isfinite(merged).all():
            raise LorakitError(f"merging adapters {names} into {self.parameter_name} gives NaN or inf weights; the adapter is broken, retrain it")
        param.copy_(merged.to(param.dtype))
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        param = self.parameter()
        if self.merged_adapters:
            param.copy_((param.float() - sum(self.delta_weight(n) for n in self.merged_adapters)).to(param.dtype))
        self.merged_adapters = []

    # --- forward ------------------------------------------------------------------------------
    def chain(self) -> list[ParamLora]:
        """This wrapper and the ParamLora layers nested under it, outermost first."""
        layers, module = [], self
        while isinstance(module, ParamLora):
            layers.append(module)
            module = module.base_layer
        return layers

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' call of the outermost wrapper: the real module's forward on adapted parameters."""
        routing = current_routing()
        chain = self.chain()
        if routing is None:
            return self.call_with(chain, None, args, kwargs)
        if any(layer.merged_adapters for layer in chain):  # every row, "__base__" ones too, would see them
            raise LorakitError("per-row adapters cannot run while adapters are merged into the weights; call unmerge_adapter() first")
        return self.call_with(chain, {}, args, kwargs) if routing.base_only else routed_call(self, chain, routing, args, kwargs)

    def call_with(self, chain: list[ParamLora], mix: dict[str, float] | None, args: tuple, kwargs: dict) -> Any:
        """The real module on its parameters plus `mix` (None: each layer's active adapters)."""
        swapped = {}
        for layer in chain:
            if layer.disabled:
                continue
            weight = layer.adapted(mix if mix is not None else dict.fromkeys(layer.active_adapters, 1.0))
            if weight is not None:
                swapped[layer.parameter_name] = weight
        module = self.real_module
        if not swapped:
            return module(*args, **kwargs)
        return functional_call(module, swapped, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return (f"parameter={self.parameter_name}, experts={self.num_experts}, in={self.in_features}, out={self.out_features}, "
                f"adapters={list(self.lora_A)}, active={self.active_adapters}")


# --- finding and injecting --------------------------------------------------------------------------
def _unwrapped(name: str) -> str:
    """A module path with ParamLora's `.base_layer` hops removed (the path users and peft name)."""
    return ".".join(p for p in name.split(".") if p != "base_layer")


def parameter_targets(model: nn.Module, targets: list[str]) -> list[tuple[str, str]]:
    """(module path, parameter name) of every parameter `targets` names (an exact `path.param` or a dotted
    suffix, peft's rule), in the model's order: a module's parameters in registration order, so nesting
    matches peft's.

    Raises:
        ConfigError: a target matches no parameter.
    """
    found: list[tuple[str, str]] = []
    hit: set[str] = set()
    for name, module in model.named_modules():
        if not name or isinstance(module, ParamLora) or any(p in LORA_PARTS for p in name.split(".")):
            continue
        path = _unwrapped(name)
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{path}.{param_name}"
            matched = [t for t in targets if key == t or key.endswith(f".{t}")]
            if matched:
                found.append((path, param_name))
                hit.update(matched)
    missing = [t for t in targets if t not in hit]
    if missing:
        stacks = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.dim() == 3 and "lora_" not in n})
        hint = f"3-D parameters in this model: {', '.join(stacks)}" if stacks else "this model has no 3-D (expert) parameters"
        raise ConfigError([f"target_parameters {missing[0]!r} match no parameter of the model ({hint})"], "LoraConfig")
    return found


def check_parameter_targets(model: nn.Module, config: LoraConfig, found: list[tuple[str, str]], module_paths: list[str]) -> None:
    """Everything that would make injecting these parameters fail, checked before anything changes."""
    if not found:
        return
    problems = []
    if config.lora_dropout:
        problems.append(f"lora_dropout must be 0 with target_parameters (got {config.lora_dropout}); dropout cannot act inside a parameter")
    if config.init_lora_weights not in PARAMETER_INITS:
        problems.append(f"init_lora_weights {config.init_lora_weights!r} does not apply to target_parameters; use true, false or gaussian")
    if config.use_dora:
        problems.append("use_dora does not apply to target_parameters (peft refuses it too); drop use_dora or target_parameters")
    clash = sorted({p for p, _ in found if p in module_paths or type(model.get_submodule(p)).__name__ == "LoraLinear"})
    if clash:
        problems.append(f"{clash[0]} is targeted by target_modules and its parameter by target_parameters; target it one way")
    for path, param_name in found:
        module = model.get_submodule(path)
        dims = (module.real_module if isinstance(module, ParamLora) else module)._parameters[param_name].dim()
        if dims not in (2, 3):
            problems.append(f"target_parameters {path}.{param_name} is {dims}-D; only 2-D and 3-D parameters can be adapted")
    if problems:
        raise ConfigError(problems, "LoraConfig")


def inject_parameters(model: nn.Module, config: LoraConfig, found: list[tuple[str, str]], adapter_name: str,
                      rank_alpha: Callable[[str], tuple[int, float]] | None = None, adapter_dtype: torch.dtype | None = None) -> None:
    """Wrap each (module path, parameter) in a ParamLora (reusing one already there) and add the adapter.
    `rank_alpha(key)` gives the (r, lora_alpha) of `path.param` (rank_pattern / alpha_pattern; default r, lora_alpha)."""
    for path, param_name in found:
        module = model.get_submodule(path)
        layer = next((w for w in (module.chain() if isinstance(module, ParamLora) else []) if w.parameter_name == param_name), None)
        if layer is None:
            layer = ParamLora(module, param_name)
            model.set_submodule(path, layer)
        r, alpha = rank_alpha(f"{path}.{param_name}") if rank_alpha else (config.r, config.lora_alpha)
        layer.add_adapter(adapter_name, r, alpha, config.use_rslora, adapter_dtype, config.init_lora_weights)


def param_layers(model: nn.Module) -> list[ParamLora]:
    """Every ParamLora of the model, nested ones included."""
    return [m for m in model.modules() if isinstance(m, ParamLora)]


@contextmanager
def params_disabled(model: nn.Module) -> Iterator[None]:
    """The base parameters only inside the block (merged adapters unmerged on entry, merged back on exit)."""
    with layers_disabled(param_layers(model)):
        yield


# --- merge_and_unload / unload ----------------------------------------------------------------------
def check_finite(model: nn.Module, adapter_names: list[str] | None) -> None:
    for layer in param_layers(model):
        names = [n for n in (adapter_names if adapter_names is not None else layer.active_adapters) if n in layer.lora_A and n not in layer.merged_adapters]
        if names and not torch.isfinite(layer.parameter().float() + sum(layer.delta_weight(n) for n in names)).all():
            raise LorakitError(f"merging adapters {names} into {layer.parameter_name} gives NaN or inf weights; the adapter is broken, retrain it")


@torch.no_grad()
def unwrap_parameters(model: nn.Module, merge: bool, adapter_names: list[str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Replace every ParamLora by the module it wraps; with `merge`, fold the active (or named) adapters
    into the parameters first (in fp32, stored in `dtype` or the parameter's own)."""
    for path, top in _outermost(model):
        real = top.real_module
        for layer in top.chain():
            param = layer.parameter()
            if merge:
                layer.merge([n for n in (adapter_names if adapter_names is not None else layer.active_adapters) if n in layer.lora_A])
            else:
                layer.unmerge()
            if dtype is not None and merge:
                param.data = param.data.to(dtype)
        model.set_submodule(path, real)


def _outermost(model: nn.Module) -> list[tuple[str, ParamLora]]:
    """(path, layer) of the ParamLora layers in the model itself, not nested in another ParamLora."""
    nested = {id(inner) for m in param_layers(model) for inner in m.chain()[1:]}
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ParamLora) and id(m) not in nested]


def set_trainable(model: nn.Module, adapter_name: str, trainable: bool) -> None:
    """requires_grad of the adapter's factors in every ParamLora (mark_trainable / freeze_adapter)."""
    for layer in param_layers(model):
        if adapter_name in layer.lora_A:
            layer.lora_A[adapter_name].requires_grad_(trainable)
            layer.lora_B[adapter_name].requires_grad_(trainable)


# --- transformers 4 expert names on fused-MoE families, as peft maps them ----------------------------
# transformers 5 fused these families' expert linears into 3-D parameters and their router into a module
# that is no nn.Linear; peft keeps the old names meaning what they meant (every expert's w1 / w3 / w2, or
# gate_proj / up_proj / down_proj, and the router `gate`), in a list or through "all-linear", by moving
# them to target_parameters, and doubles rank and alpha of the fused gate_up_proj when both of its halves
# are named (two rank-r adapters side by side). lorakit does the same, so a config means one adapter
# whichever library trains it.
_V4_EXPERT_NAMES = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"},
}
_FUSED = "gate_up_proj"


def _conversion_family(model: nn.Module) -> str | None:
    """The transformers 4 -> 5 conversion family of the model ("mixtral", "qwen2_moe") or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    try:
        from transformers import conversion_mapping
    except ImportError:
        return None
    patterns = {**getattr(conversion_mapping, "_MODEL_TO_CONVERSION_PATTERN", {}), "mixtral": "mixtral"}
    family = patterns.get(model_type)
    if family not in _V4_EXPERT_NAMES or conversion_mapping.get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return family


def with_expert_names_mapped(model: nn.Module, config: LoraConfig, all_linear: bool = False) -> LoraConfig:
    """`config` (target_modules a list; "all-linear" already expanded to leaf names, `all_linear` True) with
    the fused-MoE family's old expert and router names moved to target_parameters, as peft does.

    Raises:
        ConfigError: one half of the fused gate_up_proj is named without the other (peft refuses it too).
    """
    family = _conversion_family(model)
    if family is None or not isinstance(config.target_modules, list):
        return config
    old_names = _V4_EXPERT_NAMES[family]
    parameters, modules, halves = set(config.target_parameters or []), [], set()
    for target in config.target_modules + (list(old_names) if all_linear else []):
        old = next((o for o in old_names if target == o or target.endswith(f".{o}")), None)
        if old is None:
            modules.append(target)
            continue
        parameters.add(old_names[old])
        halves.update({old} if old_names[old] == _FUSED else set())
    if len(modules) == len(config.target_modules) and not all_linear:
        return config  # no old name: nothing to map
    needed = {o for o, n in old_names.items() if n == _FUSED}
    if halves and halves != needed:
        raise ConfigError([f"target_modules names {', '.join(sorted(halves))} without {', '.join(sorted(needed - halves))}, "
                           f"which transformers fused with it into experts.{_FUSED}; name both, or target_parameters "
                           f"['experts.{_FUSED}']"], "LoraConfig")
    changes: dict[str, Any] = dict(target_modules=sorted(set(modules)), target_parameters=sorted(parameters))
    if halves:
        pattern = rf".*\.{_FUSED}"
        changes.update(rank_pattern={**config.rank_pattern, pattern: 2 * config.r},
                       alpha_pattern={**config.alpha_pattern, pattern: 2 * config.lora_alpha})
    return dataclasses.replace(config, **changes)


def drop_empty(model: nn.Module) -> None:
    """Take out every ParamLora left without adapters (a failed load), keeping the others nested in order."""
    for path, top in _outermost(model):
        module: nn.Module = top.real_module
        for layer in reversed(top.chain()):  # innermost first
            if layer.lora_A:
                layer.base_layer = module
                module = layer
        if module is not top:
            model.set_submodule(path, module)
