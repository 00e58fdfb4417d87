"""Fused, prepacked matmuls for the generation engine on x86 CPUs.

Linear layers that read the same input (q, k, v; gate, up) run as one matmul over their concatenated
weights, kept in oneDNN's blocked layout (`torch.ops.mkldnn`, what torch.compile's CPU freezing
uses): on the default model in bf16 this measured 1.3-1.8x faster per matmul than `F.linear` on the
plain weights, at one row and at sixteen. Small bf16 matmuls pay a fixed ~10 us each through aten,
so under per-row routing the adapters' A banks (lora/layer.py: every loaded adapter's A, slot-major)
join the same fused matmul, and the group's B banks are one prepacked block-diagonal matmul added
onto the base outputs: a group of adapted layers costs one extra call, whatever its size. That
computes every loaded adapter for every row; given lorakit's routed-LoRA kernel (the decoder passes it
when compiling), each row instead reads only its own adapters, added onto the base matmul's output
(kernels/routed_lora.py: a 16-row step over 8 adapters 20.7 -> 19.0 ms on the default model).

The packed copies cost memory: the weights they pack once, and without the kernel the adapted groups
(q/k/v, o on the default model) once more with their A banks (53 MB on the default model). A copy is rebuilt when a
layer is replaced, a weight changes in place (a merge, a training step: the tensors' version counters
move) or the adapter bank changes. Anything that cannot be packed (fp32, quantized or Conv1D layers, a
GPU, a torch without oneDNN bf16) runs the modules as they are, and so does every case the fast path
does not cover (no routing, disabled or merged adapters).

A decode step makes ~120 fused calls; checking each group's freshness at each call cost ~1 ms a step
on the default model, so `Projections` resolves every group once and re-checks them all at once, from
flat lists of the layers, their tensors and those tensors' version counters (~0.1 ms)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from lorakit.kernels import quant_matmul, routed_lora
from lorakit.kernels.routed_lora import RoutedLora
from lorakit.weights.kinds import is_quantized
from lorakit.lora.layer import LoraLinear, apply_dora_gains
from lorakit.lora.routing import Routing

_linear = torch.ops.mkldnn._linear_pointwise

# A resolved group: input (..., in) and the step's routing (None without routed adapters) to the
# layers' outputs side by side (..., sum of out features).
Projection = Callable[[torch.Tensor, "Routing | None"], torch.Tensor]


@dataclass(frozen=True)
class StepProjections:
    """One step's data flow to its projections, the per-step metadata every layer reads (as vLLM's
    punica wrapper holds a step's LoRA mapping): every group resolved for this step, and the routing
    they run under. `step(g, x)` is group g's output for x."""

    projections: Sequence[Projection]
    routing: Routing | None  # None: no adapter is loaded (LoraLinear layers then add their active ones)

    def __call__(self, group: int, x: torch.Tensor) -> torch.Tensor:
        return self.projections[group](x, self.routing)


def _base(module: nn.Module) -> nn.Module:
    """The nn.Linear under a LoraLinear, or the module itself (read from _modules: called ~200 times a step)."""
    return module._modules.get("base_layer", module) if isinstance(module, LoraLinear) else module


def can_pack(modules: Sequence[nn.Module]) -> bool:
    """True when every module is a dense bf16 nn.Linear (or LoRA over one) on the CPU and oneDNN does bf16."""
    bases = [_base(m) for m in modules]
    if not all(type(b) is nn.Linear and not is_quantized(b.weight) for b in bases):
        return False
    if any(b.weight.dtype != torch.bfloat16 or b.weight.device.type != "cpu" for b in bases):
        return False
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in) bf16 weight in oneDNN's blocked layout, for torch.ops.mkldnn._linear_pointwise."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


@dataclass
class _Modules:
    """The layers run as their modules, outputs side by side."""

    modules: list[nn.Module]

    def __call__(self, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        outs = [m.add_lora(m.base_layer(x), x, routing) if isinstance(m, LoraLinear) else m(x) for m in self.modules]
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]


@dataclass
class _Packed:
    source: tuple  # what it was packed from: (base layers, their weight / bias tensors, those tensors' versions)
    bank_version: tuple  # (slot table version, adapter weights version) of the A / B banks; () without banks
    weight: torch.Tensor | None  # None: these layers cannot be packed
    bias: torch.Tensor | None = None
    width: int = 0  # output columns of the layers together
    b_banks: torch.Tensor | None = None  # packed (width, adapted layers x S*R) block-diagonal B banks
    adapted: int = 0  # layers with an A bank in the weight (after the base columns)
    kernel: tuple | None = None  # (routed_lora_, a, b, segments): adapters by the C++ kernel, not by banks in the matmuls
    gains: torch.Tensor | None = None  # (S, width): DoRA slots' m/n - 1 per output column (LoraLinear.dora_gains); None without DoRA

    def fresh(self, bases: list[nn.Module], params: list[torch.Tensor], bank_version: tuple) -> bool:
        """Packed from these very base layers and tensors, unchanged since, with these banks. (Base
        layers, not the modules around them: wrapping a layer in a LoraLinear leaves its weights as they
        were, and any change to its adapters moves the bank version.)"""
        seen, seen_params, versions = self.source
        return bank_version == self.bank_version and _same(bases, seen) and _same(params, seen_params) and versions == _versions(params)

    def __call__(self, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        """Base outputs (and every adapted layer's x A_bank^T) from one matmul; with banks, each row's
        bank columns scaled by its mix and all B banks added by one block-diagonal matmul; with the
        kernel, each row's own adapters added onto the base outputs."""
        out = _linear(x, self.weight, self.bias, "none", [], "")
        if self.gains is not None:  # DoRA rows: their base outputs rescaled before the adapters are added
            bias = self.bias[: self.width] if self.bias is not None else None
            out[..., : self.width] = apply_dora_gains(out[..., : self.width], bias, routing.slot_weights(self.gains.dtype) @ self.gains)
        if self.kernel is not None:
            op, a, b, segments = self.kernel
            x = x if x.is_contiguous() else x.contiguous()
            op(out.view(-1, self.width), x.view(-1, x.shape[-1]), a, b, segments, routing.slots, routing.weights)
            return out
        if self.b_banks is None:
            return out
        base, xa = out[..., : self.width], out[..., self.width :]
        scales = routing.column_scales(x.dtype)
        rows, columns = scales.shape
        # Out of place, so both matmul inputs and the result are contiguous (no copies: in place on the
        # column slices, each of the 60 adapted groups of a default-model step paid two).
        xa = xa.view(*xa.shape[:-1], self.adapted, columns) * scales.view(rows, *[1] * (x.dim() - 1), columns)
        return _linear(xa.flatten(-2), self.b_banks, None, "none", [], "").add_(base)


QUANTIZERS = {"int8": quant_matmul.quantize_int8, "q4_0": quant_matmul.quantize_4bit}


@dataclass
class _Quantized:
    """The layers' base weights quantized (kernels/quant_matmul.py: int8 per channel or 4-bit per block),
    each row's adapters added onto the quantized matmul's output: by the routed C++ kernel when given,
    else by each LoraLinear's own routed path on its columns (DoRA rows rescaled first either way)."""

    source: tuple  # as _Packed's: (base layers, their tensors, those tensors' versions)
    weight: quant_matmul.QuantWeight
    bias: torch.Tensor | None
    modules: list[nn.Module]
    sizes: list[int]
    kernel: RoutedLora | None
    layout: tuple | None = None  # (bank version, a, b, segments, gains) for the kernel under the current slot table

    def fresh(self, bases: list[nn.Module], params: list[torch.Tensor]) -> bool:
        seen, seen_params, versions = self.source
        return _same(bases, seen) and _same(params, seen_params) and versions == _versions(params)

    def __call__(self, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
        out = quant_matmul.matmul(x, self.weight, self.bias)
        adapted = routing is not None and not routing.base_only and any(isinstance(m, LoraLinear) for m in self.modules)
        if not adapted:
            return out
        if self.kernel is None:  # each layer's routed adapters on its own columns
            parts, start = [], 0
            for module, size in zip(self.modules, self.sizes):
                part = out[..., start : start + size]
                parts.append(module.add_lora(part, x, routing) if isinstance(module, LoraLinear) else part)
                start += size
            return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        version = bank_version_of(routing)
        if self.layout is None or self.layout[0] != version:
            device = x.device
            banks = [m.bank(routing, torch.bfloat16, device) if isinstance(m, LoraLinear) else None for m in self.modules]
            self.layout = (version, *routed_lora.layout(banks, self.sizes, routing.table.slots), _gains(self.modules, routing, device))
        _, a, b, segments, gains = self.layout
        if gains is not None:
            bias = self.bias
            out = apply_dora_gains(out, bias, routing.slot_weights(gains.dtype) @ gains)
        x = x if x.is_contiguous() else x.contiguous()
        width = sum(self.sizes)
        out = out.contiguous()
        self.kernel(out.view(-1, width), x.view(-1, x.shape[-1]), a, b, segments, routing.slots, routing.weights)
        return out


def can_quantize(modules: Sequence[nn.Module]) -> bool:
    """True when every module is a dense bf16 nn.Linear (or LoRA over one) on the CPU."""
    bases = [_base(m) for m in modules]
    return all(type(b) is nn.Linear and not is_quantized(b.weight) and b.weight.dtype == torch.bfloat16
               and b.weight.device.type == "cpu" for b in bases)


class FusedLinear:
    """Linear layers sharing one input, computed together; `resolve` gives the function that does it.

    The layers are looked up by name on their parent, not held: loading the first adapter replaces an
    nn.Linear by a LoraLinear around it, and the fused call must see that."""

    def __init__(self, parent: nn.Module, names: Sequence[str], pack: bool = True, kernel: RoutedLora | None = None,
                 quantization: str | None = None) -> None:
        """`kernel`: routed_lora's kernel, to add routed adapters with (else they join the matmuls as banks).
        `quantization` ("int8" | "q4_0"): the base weights quantized for lorakit's matmuls, where the layers
        are dense bf16 CPU linears (else as without it)."""
        self.parent = parent
        self.names = list(names)
        self.pack = pack
        self.kernel = kernel
        self.quantization = quantization
        self._quantized: _Quantized | None = None
        self._plain: _Packed | None = None  # the base weights alone
        self._routed: _Packed | None = None  # the base weights and the adapters' A banks
        self._merged: _Packed | None = None  # the base weights with one adapter merged in

    def modules(self) -> list[nn.Module]:
        return [self.parent._modules[name] for name in self.names]

    def warm(self) -> None:
        """Pack the base weights now rather than at the first batch that needs them: a server's memory
        is then taken at start-up, not in the middle of serving (53 MB for q/k/v and o of the default
        model, first needed when a batch happens to hold only base rows)."""
        if self.quantization is not None and can_quantize(self.modules()):
            self._quantized = self._quantize()
        elif self.pack:
            self._plain = _packed(self._plain, self.modules())

    def _quantize(self) -> _Quantized:
        """The layers' weights quantized (again only when a layer or weight changed)."""
        modules = self.modules()
        bases = [_base(m) for m in modules]
        params = _params(bases)
        cached = self._quantized
        if cached is not None and cached.fresh(bases, params):
            cached.modules = modules  # a layer wrapped in a LoraLinear keeps its weights
            return cached
        weight = QUANTIZERS[self.quantization](_cat([b.weight for b in bases]).contiguous())
        return _Quantized((bases, params, _versions(params)), weight, _bias(bases), modules, [b.out_features for b in bases], self.kernel)

    def resolve(self, routing: Routing | None, dtype: torch.dtype, merge: bool = False) -> Projection:
        """The layers' outputs for inputs of `dtype` under `routing`: packed where that applies. With
        `merge` (every row on routing.single_slot's adapter at scale 1), that adapter merged into a copy
        of the weights: the batch then costs what the base does."""
        modules = self.modules()
        if not self.pack or dtype != torch.bfloat16:
            return _Modules(modules)
        adapted = [m for m in modules if isinstance(m, LoraLinear)]
        if any(m.disabled or m.merged_adapters for m in adapted) or (adapted and routing is None):
            return _Modules(modules)  # LoraLinear's own forward applies (or refuses) these cases
        if self.quantization is not None and can_quantize(modules):  # never merged: the adapters stay beside the quantized base
            self._quantized = self._quantize()
            return self._quantized
        if adapted and not routing.base_only and merge:
            self._merged = packed = _packed(self._merged, modules, adapted, routing, merge=True)
        elif adapted and not routing.base_only and self.kernel is not None:
            self._plain = _packed(self._plain, modules)
            self._routed = packed = _by_kernel(self._routed, self._plain, modules, routing, self.kernel)
        elif adapted and not routing.base_only:
            self._routed = packed = _packed(self._routed, modules, adapted, routing)
        else:
            self._plain = packed = _packed(self._plain, modules)
        return _Modules(modules) if packed.weight is None else packed


def _packed(cached: _Packed | None, modules: list[nn.Module], adapted: Sequence[LoraLinear] = (),
            routing: Routing | None = None, merge: bool = False) -> _Packed:
    """`cached` if still fresh, else the layers packed anew: their weights, then the A bank of each
    `adapted` layer (under `routing`'s slot table), with the B banks as one block-diagonal matrix; or,
    with `merge`, the weights with routing.single_slot's adapter added in (in fp32, as a merge does)."""
    bases = [_base(m) for m in modules]
    params = _params(bases)
    bank_version = (*bank_version_of(routing), routing.single_slot if merge else 0) if adapted else ()
    if cached is not None and cached.fresh(bases, params, bank_version):
        return cached
    source = (bases, params, _versions(params))
    if not can_pack(modules):
        return _Packed(source, bank_version, None)
    sizes = [b.out_features for b in bases]
    if merge:
        name = next(n for n, slot in routing.table.slot_of.items() if slot == routing.single_slot)
        weights = [_merged_weight(m, name) if isinstance(m, LoraLinear) else m.weight for m in modules]
        return _Packed(source, bank_version, pack(_cat(weights)), _bias(bases), sum(sizes))
    banks = {id(m): m.bank(routing, torch.bfloat16, bases[0].weight.device) for m in adapted}  # A (S*R, in), B (out, S*R)
    width = next(iter(banks.values()))[0].shape[0] if banks else 0
    weight = _cat([b.weight for b in bases] + [banks[id(m)][0] for m in adapted])
    b_banks = None
    if banks:
        b_banks = torch.zeros(sum(sizes), width * len(adapted), dtype=torch.bfloat16)
        row, column = 0, 0
        for module, size in zip(modules, sizes):
            if id(module) in banks:
                b_banks[row : row + size, column : column + width] = banks[id(module)][1]
                column += width
            row += size
        b_banks = pack(b_banks)
    return _Packed(source, bank_version, pack(weight), _bias(bases, extra=width * len(adapted)), sum(sizes), b_banks, len(adapted),
                   gains=_gains(modules, routing, bases[0].weight.device) if banks else None)


def _by_kernel(cached: _Packed | None, plain: _Packed, modules: list[nn.Module], routing: Routing,
               kernel: RoutedLora) -> _Packed:
    """`cached` if still fresh, else the base weights as packed in `plain` (shared, not copied) with the
    adapters' banks laid out for routed_lora's kernel."""
    bank_version = bank_version_of(routing)
    if cached is not None and cached.source is plain.source and cached.bank_version == bank_version:
        return cached
    if plain.weight is None:
        return plain
    bases = [_base(m) for m in modules]
    device = bases[0].weight.device
    banks = [m.bank(routing, torch.bfloat16, device) if isinstance(m, LoraLinear) else None for m in modules]
    a, b, segments = routed_lora.layout(banks, [base.out_features for base in bases], routing.table.slots)
    return _Packed(plain.source, bank_version, plain.weight, plain.bias, plain.width, kernel=(kernel, a, b, segments),
                   gains=_gains(modules, routing, device))


def _gains(modules: list[nn.Module], routing: Routing, device: torch.device) -> torch.Tensor | None:
    """The group's DoRA gains side by side, (S, width): each DoRA layer's dora_gains, zeros for the
    other layers; None when no layer of the group has a DoRA adapter."""
    parts = [m.dora_gains(routing, torch.bfloat16, device) if isinstance(m, LoraLinear) else None for m in modules]
    if all(p is None for p in parts):
        return None
    count = routing.table.slots
    return torch.cat([p if p is not None else torch.zeros(count, _base(m).out_features, dtype=torch.bfloat16, device=device)
                      for p, m in zip(parts, modules)], dim=1)


def _merged_weight(layer: LoraLinear, name: str) -> torch.Tensor:
    weight = layer.base_layer.weight
    return layer.merged_weight([name]).to(weight.dtype) if name in layer.lora_A else weight


def bank_version_of(routing: Routing | None) -> tuple:
    return (routing.table.version, routing.table.weights_version) if routing is not None else ()


MERGE_AFTER = 32  # forward steps on one adapter before its merged weights are built (40-54 ms on the default model)


class Projections:
    """Every fused group of a model resolved for one routing, re-resolved only when something they
    depend on changed: a layer replaced, a weight changed in place, an adapter disabled or merged, the
    routing's kind (none, base rows only, adapters) or its adapter banks.

    When the same rows (one Routing object: the engine keeps it while its rows run) have all used one
    adapter for MERGE_AFTER steps (one stream, or a batch for one adapter), the adapted groups switch
    to weights with that adapter merged in: at one row of the default model that took a decode step
    from 14 to 12 ms, the base's cost, for one more copy of the adapted weights (53 MB there). The
    streak keeps a mixed workload from rebuilding merged weights whenever its rows happen to share an
    adapter for a moment, and restarting it with the rows makes a request run alone take the same
    path, so the same tokens, every time."""

    def __init__(self, groups: Sequence[FusedLinear]) -> None:
        self.groups = list(groups)
        self._where = [(g.parent._modules, name) for g in self.groups for name in g.names]  # flat: checked every step
        self._key: tuple | None = None
        self._state: tuple = ()
        self._streak: tuple[Routing | None, int] = (None, 0)  # (a single-adapter routing, steps in a row under it)
        self._resolved: list[Projection] = []

    def warm(self) -> None:
        for group in self.groups:
            group.warm()

    def resolve(self, routing: Routing | None, dtype: torch.dtype) -> list[Projection]:
        """One Projection per group, in order."""
        slot = routing.single_slot if routing is not None else 0
        self._streak = (routing, self._streak[1] + 1 if slot and routing is self._streak[0] else 1)
        merge = bool(slot) and self._streak[1] > MERGE_AFTER
        key = (dtype, routing is None, routing is not None and routing.base_only, bank_version_of(routing), merge and slot)
        if key != self._key or not self._unchanged():
            self._resolved = [g.resolve(routing, dtype, merge) for g in self.groups]
            self._key, self._state = key, self._snapshot()
        return self._resolved

    def _snapshot(self) -> tuple:
        modules = [children[name] for children, name in self._where]
        bases = [_base(m) for m in modules]
        params = _params(bases)
        lora = [m for m in modules if isinstance(m, LoraLinear)]
        return modules, bases, params, _versions(params), lora, _lora_flags(lora)

    def _unchanged(self) -> bool:
        modules, bases, params, versions, lora, flags = self._state
        now = [children[name] for children, name in self._where]
        return (_same(now, modules) and _same([_base(m) for m in now], bases) and _same(_params(bases), params)
                and _versions(params) == versions and _lora_flags(lora) == flags)


def _same(these: Sequence, those: Sequence) -> bool:
    """The very same objects, in order (tensors compare by identity here, never by value)."""
    return len(these) == len(those) and all(map(operator.is_, these, those))


def _lora_flags(layers: list[LoraLinear]) -> list[bool]:
    return [m.disabled or bool(m.merged_adapters) for m in layers]


def _params(bases: list[nn.Module]) -> list[torch.Tensor]:
    return [p for b in bases for p in (b._parameters.get("weight"), b._parameters.get("bias")) if p is not None]


def _versions(params: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(p._version for p in params)


def _cat(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(weights) if len(weights) > 1 else weights[0]


def _bias(bases: list[nn.Module], extra: int = 0) -> torch.Tensor | None:
    """The layers' biases side by side (zeros for a layer without one, and for `extra` bank columns);
    None when no layer has a bias."""
    if all(b.bias is None for b in bases):
        return None
    dtype = bases[0].weight.dtype
    parts = [b.bias if b.bias is not None else torch.zeros(b.out_features, dtype=dtype) for b in bases]
    return torch.cat(parts + [torch.zeros(extra, dtype=dtype)])
