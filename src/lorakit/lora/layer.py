"""`LoraLinear`: a frozen base layer plus named low-rank adapters.

h = base(x) + scaling * B(A(dropout(x))), with A (r x in) Kaiming-uniform and B (out x r) zero, so a
fresh adapter changes nothing. Attribute names (`base_layer`, `lora_A.<name>`, `lora_B.<name>`) are
peft's, so a state dict key here is a peft key minus its `base_model.model.` prefix.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from lorakit.errors import LorakitError


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored transposed, as (in, out)."""
    return type(module).__name__ == "Conv1D"


def layer_shape(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer: nn.Linear, bitsandbytes' Linear4bit /
    Linear8bitLt (both nn.Linear subclasses) or GPT-2's Conv1D (weight stored as in x out)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if is_conv1d(base):
        in_features, out_features = base.weight.shape
        return in_features, out_features
    raise LorakitError(
        f"cannot put LoRA on a {type(base).__name__}; lorakit adapts Linear and Conv1D layers, so pick those in target_modules"
    )


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense tensor in its stored layout (dequantized if needed)."""
    from lorakit.quant.dequant import dense_weight  # quantized layers know how to unpack themselves

    return dense_weight(base)


class LoraLinear(nn.Module):
    """A linear-like layer with any number of named LoRA adapters, some of them active."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_shape(base_layer)
        # The stored layout decides, not the flag: a wrong `fan_in_fan_out` would transpose the delta and
        # silently corrupt merges of square layers (peft overrides the flag the same way, with a warning).
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # --- adapters -----------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        device = next(self.base_layer.parameters()).device
        dtype = dtype or torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        del self.scaling[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        if self.merged_adapters and set(names) != set(self.merged_adapters):
            self.unmerge()
        self.active_adapters = [n for n in names if n in self.lora_A]

    # --- merging ------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A in fp32, in the base weight's layout ((in, out) for Conv1D). Every merge path uses this."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        delta = (b @ a) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        """Add the active (or given) adapters into the base weight; outputs stay the same."""
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters]
        if not names:
            return
        weight = self.base_layer.weight
        if type(weight).__name__ in ("Params4bit", "Int8Params"):
            raise LorakitError("cannot merge in place into a quantized base layer; use merge_and_unload() or `lorakit merge`, which dequantize first")
        merged = weight.float() + sum(self.delta_weight(n) for n in names)
        if safe and not torch.isfinite(merged).all():
            raise LorakitError(f"merging adapters {names} gives NaN or inf weights; the adapter is broken, retrain it")
        weight.copy_(merged.to(weight.dtype))
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        if self.merged_adapters:
            restored = weight.float() - sum(self.delta_weight(n) for n in self.merged_adapters)
            weight.copy_(restored.to(weight.dtype))
        self.merged_adapters = []

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x)
        result = self.base_layer(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            lora_a, lora_b, scaling = self.lora_A[name], self.lora_B[name], self.scaling[name]
            if autocast:
                # One addmm adds x A^T (s B)^T onto the base output: no separate scale and add passes
                # over the (tokens, out) result, forward or backward. Autocast picks bf16 for all three.
                xa = lora_a(self.lora_dropout[name](x))  # (..., r)
                flat = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]), (lora_b.weight * scaling).T)
                result = flat.view(result.shape)
            else:
                x_lora = self.lora_dropout[name](x.to(lora_a.weight.dtype))
                result = result + (lora_b(lora_a(x_lora)) * scaling).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.lora_A)}, active={self.active_adapters}"


class ModulesToSave(nn.Module):
    """A module trained in full: the frozen original plus one trainable copy per adapter (peft's layout)."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        import copy

        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.modules_to_save[name].requires_grad_(True)
        self.active_adapter = self.active_adapter or name

    def set_active(self, names: list[str]) -> None:
        chosen = [n for n in names if n in self.modules_to_save]
        self.active_adapter = chosen[0] if chosen else None

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    def forward(self, *args, **kwargs):
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the bare base model inside the block (merged adapters are unmerged first)."""
    layers = [m for m in model.modules() if isinstance(m, (LoraLinear, ModulesToSave))]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.disabled = was
