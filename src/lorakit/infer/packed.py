"""Fused, prepacked matmuls for the generation engine on x86 CPUs.

Linear layers that read the same input (q, k, v; gate, up) run as one matmul over their concatenated
weights, kept in oneDNN's blocked layout (`torch.ops.mkldnn`, what torch.compile's CPU freezing
uses): on the default model in bf16 this measured 1.3-1.8x faster per matmul than `F.linear` on the
plain weights, at one row and at sixteen. Small bf16 matmuls pay a fixed ~10 us each through aten,
so under per-row routing the adapters' A banks (lora/layer.py: every loaded adapter's A, slot-major)
join the same fused matmul, and the group's B banks are one prepacked block-diagonal matmul added
onto the base outputs: a group of adapted layers costs one extra call, whatever its size.

The packed copies cost memory: the weights they pack once, and the adapted groups (q/k/v, o on the
default model) once more with their A banks (53 MB on the default model). A copy is rebuilt when a
layer is replaced, a weight changes in place (a merge, a training step: the tensors' version counters
move) or the adapter bank changes. Anything that cannot be packed (fp32, quantized or Conv1D layers, a GPU, a torch
without oneDNN bf16) runs the modules as they are, and so does every case the fast path does not
cover (no routing, disabled or merged adapters): LoraLinear.add_lora then does what forward would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lorakit.lora.base_layer import is_quantized
from lorakit.lora.layer import LoraLinear
from lorakit.lora.routing import Routing, current_routing

_linear = torch.ops.mkldnn._linear_pointwise


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLinear) else module


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
class _Packed:
    source: tuple  # what it was packed from: (layers, their weight / bias tensors, those tensors' versions)
    bank_version: tuple  # (slot table version, adapter weights version) of the A / B banks; () without banks
    weight: torch.Tensor | None  # None: these layers cannot be packed
    bias: torch.Tensor | None = None
    sizes: tuple[int, ...] = ()  # output columns of each layer
    b_banks: torch.Tensor | None = None  # packed (sum of outputs, adapted layers x S*R) block-diagonal B banks
    adapted: int = 0  # layers with an A bank in the weight (after the base columns)

    def fresh(self, modules: list[nn.Module], params: list[torch.Tensor], bank_version: tuple) -> bool:
        """Packed from these very layers and tensors, unchanged since, with these banks."""
        seen, seen_params, versions = self.source
        return (bank_version == self.bank_version and all(a is b for a, b in zip(modules, seen))
                and all(a is b for a, b in zip(params, seen_params)) and versions == _versions(params))


class FusedLinear:
    """Linear layers sharing one input, computed together: `fused(x)` returns each layer's output.

    The layers are looked up by name on their parent at every call, not held: loading the first
    adapter replaces an nn.Linear by a LoraLinear around it, and the fused call must see that."""

    def __init__(self, parent: nn.Module, names: Sequence[str], pack: bool = True) -> None:
        self.parent = parent
        self.names = list(names)
        self.pack = pack
        self._plain: _Packed | None = None  # the base weights alone
        self._routed: _Packed | None = None  # the base weights and the adapters' A banks

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        modules = [self.parent._modules[name] for name in self.names]  # not getattr: this runs ~150 times a step
        if not self.pack or x.dtype != torch.bfloat16:
            return [m(x) for m in modules]
        routing = current_routing()
        adapted = [m for m in modules if isinstance(m, LoraLinear)]
        if routing is not None and not routing.base_only and adapted and all(not m.disabled and not m.merged_adapters for m in adapted):
            self._routed = packed = _packed(self._routed, modules, adapted, routing)
            if packed.weight is not None:
                return self._run_routed(x, packed, modules, routing)
        self._plain = packed = _packed(self._plain, modules)
        if packed.weight is None:
            return [m(x) for m in modules]
        out = _linear(x, packed.weight, packed.bias, "none", [], "")
        outs = out.split(packed.sizes, dim=-1) if len(modules) > 1 else (out,)
        return [m.add_lora(o, x) if isinstance(m, LoraLinear) else o for m, o in zip(modules, outs)]

    def _run_routed(self, x: torch.Tensor, packed: _Packed, modules: list[nn.Module], routing: Routing) -> list[torch.Tensor]:
        """Base outputs and every adapted layer's x A_bank^T from one matmul; each row's bank columns
        scaled by its mix; all B banks added onto the base outputs by one block-diagonal matmul."""
        out = _linear(x, packed.weight, packed.bias, "none", [], "")
        width = sum(packed.sizes)
        base, xa = out[..., :width], out[..., width:]
        scales = routing.column_scales(torch.bfloat16)  # (B, S*R), the same for every layer
        rows, columns = scales.shape
        xa.view(*xa.shape[:-1], packed.adapted, columns).mul_(scales.view(rows, *[1] * (x.dim() - 1), columns))
        base.add_(_linear(xa, packed.b_banks, None, "none", [], ""))
        return list(base.split(packed.sizes, dim=-1)) if len(modules) > 1 else [base]


def _packed(cached: _Packed | None, modules: list[nn.Module], adapted: Sequence[LoraLinear] = (),
            routing: Routing | None = None) -> _Packed:
    """`cached` if still fresh, else the layers packed anew: their weights, then the A bank of each
    `adapted` layer (under `routing`'s slot table), with the B banks as one block-diagonal matrix."""
    bases = [_base(m) for m in modules]
    params = _params(bases)
    bank_version = (routing.table.version, routing.table.weights_version) if adapted else ()
    if cached is not None and cached.fresh(modules, params, bank_version):
        return cached
    source = (modules, params, _versions(params))
    if not can_pack(modules):
        return _Packed(source, bank_version, None)
    sizes = tuple(b.out_features for b in bases)
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
    return _Packed(source, bank_version, pack(weight), _bias(bases, extra=width * len(adapted)), sizes, b_banks, len(adapted))


def _params(bases: list[nn.Module]) -> list[torch.Tensor]:
    return [p for b in bases for p in (getattr(b, "weight", None), getattr(b, "bias", None)) if p is not None]


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
