"""`LoraLinear`: a frozen base layer plus named low-rank adapters.

h = base(x) + scaling * B(A(dropout(x))), with A (r x in) Kaiming-uniform and B (out x r) zero, so a
fresh adapter changes nothing (lora/init.py has peft's other initialisations). A DoRA adapter also has a
magnitude per output feature (lora/dora.py has its math). Attribute names (`base_layer`, `lora_A.<name>`,
`lora_B.<name>`, `lora_magnitude_vector.<name>`) are peft's, so a state dict key here is a peft key minus
its `base_model.model.` prefix.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora import dora
from lorakit.lora.base_layer import is_conv1d, layer_shape
from lorakit.lora.routing import Routing, current_routing
from lorakit.weights.dequant import dense_weight
from lorakit.weights.kinds import is_quantized


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
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: m, (out,)
        self.scaling: dict[str, float] = {}
        self._merge_norms: dict[str, torch.Tensor] = {}  # DoRA: the norm each merged adapter was merged with
        self.base_rewritten_by: tuple[str, str] | None = None  # (adapter, init) that left W a residual (lora/init.py)
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
        use_dora: bool = False,
        init: bool | str = True,
        loftq_config: dict | None = None,
        original: torch.Tensor | None = None,
    ) -> None:
        """Add adapter `name`, initialised as `init` (peft's init_lora_weights) says; a DoRA adapter's
        magnitude starts at the row norms of W + scaling * B A (after the init, which may change W)."""
        from lorakit.lora.init import initialise  # init.py reads LoraLinear's attributes: imported late

        device = next(self.base_layer.parameters()).device
        dtype = dtype or torch.float32
        # Constructed as peft constructs them (each nn.Linear draws its own default init), so a seeded run
        # draws the same random numbers as peft's.
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        initialise(self, name, init, loftq_config or {}, original)
        if use_dora:
            norm = dora.initial_magnitude(self.dense_weight(), self.delta_weight(name, layout="linear"))
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(device=device, dtype=dtype))
        if not self.active_adapters:
            self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        del self.scaling[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        """Activate `names` (checked against the model's adapters by LoraModel; a name this layer does
        not adapt is kept and simply contributes nothing here)."""
        if self.merged_adapters and set(names) != set(self.merged_adapters):
            self.unmerge()
        self.active_adapters = list(names)

    # --- merging ------------------------------------------------------------------------------
    def delta_weight(self, name: str, layout: str = "base") -> torch.Tensor:
        """scaling * B A in fp32, in the base weight's layout ((in, out) for Conv1D), or nn.Linear's (out,
        in) with layout="linear". Every merge path uses this."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        delta = (b @ a) * self.scaling[name]
        return delta.T if self.fan_in_fan_out and layout == "base" else delta

    def dense_weight(self) -> torch.Tensor:
        """The base weight in fp32 and nn.Linear's (out, in) layout, dequantized if it is quantized."""
        weight = dense_weight(self.base_layer).float()
        return weight.T if self.fan_in_fan_out else weight

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def fold(self, weight: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`weight` (the unmerged base, fp32, the base layout) with `names` merged in one after another as
        peft merges them: a LoRA adapter adds its delta, a DoRA adapter rescales the rows of (weight so far
        + delta) by m / ||W + delta||, the norm taken on the unmerged W as its forward takes it.
        Returns the merged weight and the norms used (unmerge divides them out again)."""
        base = linear = weight.T if self.fan_in_fan_out else weight
        norms = {}
        for name in names:
            delta = self.delta_weight(name, layout="linear")
            if self.is_dora(name):
                norms[name] = dora.weight_norm(base, delta)
                linear = dora.dora_weight(linear, delta, self.lora_magnitude_vector[name], norms[name])
            else:
                linear = linear + delta
        return (linear.T if self.fan_in_fan_out else linear), norms

    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The base weight with these adapters merged in, in fp32 (what merge writes back)."""
        return self.fold(self.base_layer.weight.float(), names)[0]

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        """Merge the active (or given) adapters into the base weight; outputs stay the same."""
        names = [n for n in (names or self.active_adapters) if n in self.lora_A and n not in self.merged_adapters]
        if not names:
            return
        weight = self.base_layer.weight
        if is_quantized(weight):
            raise LorakitError("cannot merge in place into a quantized base layer; use merge_and_unload() or `lorakit merge`, which dequantize first")
        already = list(self.merged_adapters)
        if already and any(self.is_dora(n) for n in names + already):
            # a DoRA norm is taken on the unmerged weight, as its forward takes it: merge all again from there
            self.unmerge()
            names = already + names
        merged, norms = self.fold(weight.float(), names)
        if safe and not torch.isfinite(merged).all():
            if already and not self.merged_adapters:
                self.merge(already)  # back to what was merged before
            raise LorakitError(f"merging adapters {names} gives NaN or inf weights; the adapter is broken, retrain it")
        weight.copy_(merged.to(weight.dtype))
        self._merge_norms.update(norms)
        self.merged_adapters = self.merged_adapters + names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapters out again, the last merged first (a DoRA rescale is divided out)."""
        weight = self.base_layer.weight
        if not self.merged_adapters:
            return
        linear = weight.float().T if self.fan_in_fan_out else weight.float()
        for name in reversed(self.merged_adapters):
            delta = self.delta_weight(name, layout="linear")
            if self.is_dora(name):
                scale = dora.magnitude_scale(self.lora_magnitude_vector[name].float(), self._merge_norms.pop(name))
                linear = linear / scale[:, None] - delta
            else:
                linear = linear - delta
        weight.copy_((linear.T if self.fan_in_fan_out else linear).to(weight.dtype))
        self.merged_adapters = []

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' call: the routing comes from LoraModel's door (lora/routing.routed), if any."""
        return self.add_lora(self.base_layer(x), x, current_routing())

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        """The base layer's output `result` for input `x` plus whatever adapters apply: each row's own
        under `routing`, else (None) the active ones. Split from forward so the generation engine, which
        passes its step's routing explicitly, adds the same adapter terms."""
        if self.disabled:
            return result
        if routing is not None:
            if self.merged_adapters:  # every row, "__base__" ones too, would see the merged weights
                raise LorakitError("per-row adapters cannot run while adapters are merged into the weights; call unmerge_adapter() first")
            return result if routing.base_only else self._add_routed(result, x, routing)
        for name in self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                result = self._add_adapter(result, x, name)
        return result

    def _add_adapter(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """result + scaling * B A dropout(x), as one addmm onto the base output (no separate scale and
        add passes over the (tokens, out) result, forward or backward). Under autocast the matmuls run
        in its dtype; otherwise in the adapter's, cast back to the base output's dtype."""
        if self.is_dora(name):
            return self._add_dora(result, x, name)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(lora_a.weight.dtype)
        xa = lora_a(self.lora_dropout[name](x))  # (..., r)
        flat = torch.addmm(result.reshape(-1, self.out_features).to(xa.dtype), xa.reshape(-1, xa.shape[-1]),
                           (lora_b.weight * self.scaling[name]).T.to(xa.dtype))
        return flat.view(result.shape).to(result.dtype)

    def _add_dora(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """result + (m/n - 1) W x' + m/n s B A x' (lora/dora.py), as peft computes it: x' is the dropped-out
        input, and without dropout (or in eval) W x' is the result so far minus the bias, not recomputed.
        With several active adapters that result includes the earlier ones' terms, as in peft."""
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(lora_a.weight.dtype)
        bias = getattr(self.base_layer, "bias", None)
        scale = dora.magnitude_scale(self.lora_magnitude_vector[name], self.dora_norm(name))  # (out,)
        if isinstance(dropout, nn.Identity) or not self.training:
            # m/n (result + s B A x) + bias (1 - m/n): the plain LoRA addmm, then one multiply
            xa = lora_a(x)  # (..., r)
            combined = torch.addmm(result.reshape(-1, self.out_features).to(xa.dtype), xa.reshape(-1, xa.shape[-1]),
                                   (lora_b.weight * self.scaling[name]).T.to(xa.dtype))
            return dora.rescale_output(combined, scale, bias).view(result.shape).to(result.dtype)
        x = dropout(x)
        base_out = self.base_layer(x)  # W x' on the dropped-out input, as peft recomputes it
        base_out = base_out if bias is None else base_out - bias
        lora_out = lora_b(lora_a(x)) * self.scaling[name]  # (..., out)
        return dora.add_dora(result.to(lora_out.dtype), base_out.to(lora_out.dtype), lora_out, scale).to(result.dtype)

    def dora_norm(self, name: str) -> torch.Tensor:
        """||W + s B A|| per output row for DoRA adapter `name` (detached, fp32). Outside training it is
        cached until A, B or W change (peft caches it in eval too); training recomputes it every step."""
        a, b, w = self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer.weight
        key = (a._version, b._version, w._version, a.data_ptr(), b.data_ptr(), w.data_ptr())
        cache = self.__dict__.setdefault("_dora_norms", {})  # not a buffer: never in a state dict
        if not self.training and name in cache and cache[name][0] == key:
            return cache[name][1]
        norm = dora.weight_norm(self.dense_weight(), self.delta_weight(name, layout="linear"))
        cache[name] = (key, norm)
        return norm

    def _add_routed(self, result: torch.Tensor, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Each row its own adapter mix, in two matmuls for the whole batch whatever the number of
        distinct adapters: x times every bank slot's A at once (B, T, S*R), each row's columns scaled by
        its weight for that slot (zero for slots it does not use), then times every slot's scaled B."""
        rows = x.shape[0]
        if rows != routing.rows:
            raise LorakitError(f"adapter routing has {routing.rows} rows but the batch has {rows}; pass one adapter name per row")
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else result.dtype
        a_bank, b_bank, gains = self._banks(routing, dtype, x.device)  # (S*R, in), (out, S*R), DoRA's (S, out)
        if x.dtype != dtype:
            x = x.to(dtype)
        if gains is not None:  # DoRA rows: the base output W x rescaled per feature first
            result = apply_dora_gains(result, getattr(self.base_layer, "bias", None), routing.slot_weights(gains.dtype) @ gains)
        if routing.single_slot:  # one adapter for the whole batch: its own rank columns only
            width = routing.table.rank_width
            cols = slice((routing.single_slot - 1) * width, routing.single_slot * width)
            a_bank, b_bank = a_bank[cols], b_bank[:, cols]
            return self._add_product(result, torch.nn.functional.linear(x, a_bank), b_bank, dtype)
        xa = torch.nn.functional.linear(x, a_bank).view(rows, -1, a_bank.shape[0])  # (B, T, S*R)
        xa.mul_(routing.column_scales(dtype)[:, None, :])
        return self._add_product(result, xa, b_bank, dtype)

    def _add_product(self, result: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """result + xa B^T in `dtype` (in place when the result already has it), in the result's dtype."""
        flat = result.reshape(-1, self.out_features).to(dtype)
        return flat.addmm_(xa.reshape(-1, b.shape[1]), b.T).view(result.shape).to(result.dtype)

    @torch.no_grad()
    def bank(self, routing: Routing, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A of every adapter in the slot table stacked by slot, (S*R, in), and scaling * B side by side,
        (out, S*R); each slot zero-padded to the table's rank R, zero for adapters this layer lacks. A DoRA
        adapter's B rows carry its magnitude scale m/n (the base output's share is dora_gains').
        Rebuilt only when the table, an adapter's weights or the base weight change."""
        return self._banks(routing, dtype, device)[:2]

    def dora_gains(self, routing: Routing, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """(S, out): m/n - 1 of each DoRA adapter's slot, zero for the other slots; None when this layer has
        no DoRA adapter. Row b's base output W x (bias excluded) gains slot_weights[b] @ gains: with B's
        rows scaled by m/n, a row on DoRA adapter j at weight w gets W x + w ((m/n - 1) W x + m/n s B A x),
        DoRA's output at w = 1 and, in a mix, the weighted sum of each adapter's change (as for LoRA)."""
        return self._banks(routing, dtype, device)[2]

    def _banks(self, routing: Routing, dtype: torch.dtype, device: torch.device) -> tuple:
        table = routing.table
        key = (table.version, table.weights_version, self.base_layer.weight._version, dtype, device)
        cached = getattr(self, "_bank", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        count, width = table.slots, table.rank_width
        a_bank = torch.zeros(count, width, self.in_features, dtype=dtype, device=device)
        b_bank = torch.zeros(self.out_features, count, width, dtype=dtype, device=device)
        gains = None
        for name, slot in table.slot_of.items():
            if name in self.lora_A:
                r = self.lora_A[name].weight.shape[0]
                b = self.lora_B[name].weight.float() * self.scaling[name]
                if self.is_dora(name):
                    scale = dora.magnitude_scale(self.lora_magnitude_vector[name].float(), self.dora_norm(name)).to(device)
                    b = b * scale[:, None]
                    gains = torch.zeros(count, self.out_features, dtype=dtype, device=device) if gains is None else gains
                    gains[slot - 1] = (scale - 1).to(dtype)
                a_bank[slot - 1, :r] = self.lora_A[name].weight.to(dtype)
                b_bank[:, slot - 1, :r] = b.to(dtype)
        banks = (a_bank.view(count * width, self.in_features), b_bank.view(self.out_features, count * width), gains)
        self._bank = (key, banks)
        return banks

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.lora_A)}, active={self.active_adapters}"


def apply_dora_gains(result: torch.Tensor, bias: torch.Tensor | None, gains: torch.Tensor) -> torch.Tensor:
    """result + (result - bias) * gains: each row's base output W x (its bias kept as it is) rescaled per
    feature by DoRA rows' gains (B, out), which broadcast over the tokens of a row."""
    gains = gains.view(gains.shape[0], *[1] * (result.dim() - 2), gains.shape[-1]).to(result.dtype)
    base = result if bias is None else result - bias.to(result.dtype)
    return result + base * gains


class ModulesToSave(nn.Module):
    """A module trained in full: the frozen original plus one trainable copy per adapter (peft's layout)."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
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
    """Run the bare base model inside the block. Merged adapters are unmerged on entry and merged back
    on exit, here and not as a side effect of a forward pass."""
    with layers_disabled([m for m in model.modules() if isinstance(m, (LoraLinear, ModulesToSave))]):
        yield


@contextmanager
def layers_disabled(layers: list[nn.Module]) -> Iterator[None]:
    """These adapter layers (LoraLinear, ModulesToSave, lora/expert's ParamLora) disabled inside the
    block, their merged adapters unmerged on entry and merged back on exit."""
    before = [m.disabled for m in layers]
    merged = {m: list(m.merged_adapters) for m in layers if getattr(m, "merged_adapters", None)}
    for m in merged:
        m.unmerge()
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.disabled = was
        for m, names in merged.items():
            m.merge(names)
