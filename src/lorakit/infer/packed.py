"""Fused, prepacked matmuls for the generation engine on x86 CPUs.

Linear layers that read the same input (q, k, v; gate, up) run as one matmul over their concatenated
weights, kept in oneDNN's blocked layout (`torch.ops.mkldnn`, what torch.compile's CPU freezing
uses). On the default model in bf16 this measured 1.3-1.8x faster per matmul than `F.linear` on the
plain weights, at one row and at sixteen (`bench/generate_throughput.py` reports the whole effect).
Each layer's adapters are then added onto its slice of the output by LoraLinear itself, so per-row
routing and mixes behave exactly as in the model's own forward.

The packed copy costs as much memory as the weights it packs. It is rebuilt when a weight changes in
place (a merge, a training step), detected from the tensors' version counters. Anything that cannot be
packed (fp32, quantized or Conv1D layers, a GPU, a torch without oneDNN bf16) runs the modules as they are."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lorakit.lora.base_layer import is_quantized
from lorakit.lora.layer import LoraLinear


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


class FusedLinear:
    """Linear layers sharing one input, computed together: `fused(x)` returns each layer's output.

    The layers are looked up by name on their parent at every call, not held: loading the first
    adapter replaces an nn.Linear by a LoraLinear around it, and the fused call must see that."""

    def __init__(self, parent: nn.Module, names: Sequence[str], pack: bool = True) -> None:
        self.parent = parent
        self.names = list(names)
        self.pack = pack
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self._sizes: list[int] = []
        self._packed_from: tuple[list[nn.Module], list[torch.Tensor], tuple[int, ...]] | None = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        modules = [self.parent._modules[name] for name in self.names]  # not getattr: this runs ~150 times a step
        if not self.pack or x.dtype != torch.bfloat16 or not self._refresh(modules):
            return [m(x) for m in modules]
        out = torch.ops.mkldnn._linear_pointwise(x, self._weight, self._bias, "none", [], "")
        outs = out.split(self._sizes, dim=-1) if len(modules) > 1 else (out,)
        return [m.add_lora(o, x) if isinstance(m, LoraLinear) else o for m, o in zip(modules, outs)]

    def _refresh(self, modules: list[nn.Module]) -> bool:
        """Pack the weights on first use, and again whenever a layer was replaced or one of its
        parameters changed in place (its version counter moved); False when they cannot be packed."""
        if self._packed_from is not None:
            seen, params, versions = self._packed_from
            if all(a is b for a, b in zip(modules, seen)) and versions == tuple(p._version for p in params):
                return self._weight is not None
        bases = [_base(m) for m in modules]
        params = [p for b in bases for p in (getattr(b, "weight", None), getattr(b, "bias", None)) if p is not None]
        self._packed_from, self._weight = (modules, params, tuple(p._version for p in params)), None
        if not can_pack(modules):
            return False
        with torch.no_grad():
            weight = torch.cat([b.weight for b in bases]) if len(bases) > 1 else bases[0].weight
            self._weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
            biases = [b.bias if b.bias is not None else torch.zeros(b.out_features, dtype=b.weight.dtype) for b in bases]
            self._bias = torch.cat(biases) if any(b.bias is not None for b in bases) else None
        self._sizes = [b.out_features for b in bases]
        return True
