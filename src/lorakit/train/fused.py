"""Swap Llama-family norms and MLPs onto lorakit's memory-lean kernels, and nn.Dropout onto its fast
hash-mask dropout (kernels/dropout.py, CPU tensors), for training.

Only modules whose forward is exactly the Llama one are swapped (checked by class name and
attributes); anything else keeps transformers' code. The swap is scoped to the thread that trains:
`lean_blocks` gives each such module a forward that runs the kernel only in a thread inside the block
and the module's own forward otherwise, so generation on the same model from another thread is never
affected. The first thread to enter installs those forwards, the last to leave removes them."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from lorakit.kernels.dropout import dropout
from lorakit.kernels.rms_norm import rms_norm
from lorakit.kernels.swiglu import swiglu

LLAMA_STYLE_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
LLAMA_STYLE_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}

_local = threading.local()  # .depth: how many lean_blocks this thread is inside
_lock = threading.Lock()
_users: dict[int, int] = {}  # id(module) -> threads inside lean_blocks for it


def lean_blocks_active() -> bool:
    """True in a thread inside `lean_blocks` (a training step)."""
    return getattr(_local, "depth", 0) > 0


def _norm_forward(module: nn.Module, original: Callable) -> Callable:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        # An fp32 weight (prepare_model_for_kbit_training keeps norms in fp32) is fine: the kernel
        # upcasts anyway, and prepare's hook casts the output back to the input dtype.
        if not lean_blocks_active() or module.weight.requires_grad:
            return original(hidden_states)
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)

    return forward


def _mlp_forward(module: nn.Module, original: Callable) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not lean_blocks_active():
            return original(x)
        return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x)))

    return forward


def _dropout_forward(module: nn.Module, original: Callable) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not lean_blocks_active() or not module.training or x.device.type != "cpu":
            return original(x)
        return dropout(x, module.p)

    return forward


_FORWARDS = {"norm": _norm_forward, "mlp": _mlp_forward, "dropout": _dropout_forward}


def _swappable(module: nn.Module) -> str | None:
    if type(module) is nn.Dropout and not module.inplace:
        return "dropout"
    name = type(module).__name__
    if name in LLAMA_STYLE_NORMS and hasattr(module, "variance_epsilon"):
        return "norm"
    if name in LLAMA_STYLE_MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
        return "mlp"
    return None


def _install(module: nn.Module, kind: str) -> bool:
    """Give `module` the thread-aware forward (once, however many threads train it); False if it has a
    forward of someone else's."""
    key = id(module)
    with _lock:
        if _users.get(key, 0) == 0:
            if "forward" in module.__dict__:
                return False
            original = type(module).forward.__get__(module)
            module.forward = _FORWARDS[kind](module, original)
        _users[key] = _users.get(key, 0) + 1
    return True


def _uninstall(module: nn.Module) -> None:
    key = id(module)
    with _lock:
        _users[key] -= 1
        if _users[key] == 0:
            del _users[key]
            del module.forward


@contextmanager
def lean_blocks(model: nn.Module) -> Iterator[int]:
    """Inside the block, this thread's Llama-style norms, SwiGLU MLPs and dropouts use the lean kernels;
    yields how many modules were swapped."""
    swapped = [m for m in model.modules() if (kind := _swappable(m)) is not None and _install(m, kind)]
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield len(swapped)
    finally:
        _local.depth -= 1
        for module in swapped:
            _uninstall(module)
