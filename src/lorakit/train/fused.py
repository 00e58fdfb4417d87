"""Swap Llama-family norms and MLPs onto lorakit's memory-lean kernels for training.

Only modules whose forward is exactly the Llama one are swapped (checked by class name and
attributes); anything else keeps transformers' code. The swap is per instance and reversible."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from lorakit.kernels.rms_norm import rms_norm
from lorakit.kernels.swiglu import swiglu

LLAMA_STYLE_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
LLAMA_STYLE_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


def _norm_forward(module: nn.Module, original):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        # An fp32 weight (prepare_model_for_kbit_training keeps norms in fp32) is fine: the kernel
        # upcasts anyway, and prepare's hook casts the output back to the input dtype.
        if module.weight.requires_grad:
            return original(hidden_states)
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)

    return forward


def _mlp_forward(module: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x)))

    return forward


def _swappable(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name in LLAMA_STYLE_NORMS and hasattr(module, "variance_epsilon"):
        return "norm"
    if name in LLAMA_STYLE_MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
        return "mlp"
    return None


@contextmanager
def lean_blocks(model: nn.Module) -> Iterator[int]:
    """Inside the block, Llama-style norms and SwiGLU MLPs use the lean kernels; yields how many were swapped."""
    swapped = []
    for module in model.modules():
        kind = _swappable(module)
        if kind is None or "forward" in module.__dict__:
            continue
        module.forward = _norm_forward(module, module.forward) if kind == "norm" else _mlp_forward(module)
        swapped.append(module)
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
