"""Attention over packed rows: each example attends only to itself.

A packed row holds several examples back to back. A block-diagonal mask would push SDPA onto its slow
masked path on the CPU, so instead each example runs on its own slice through lorakit's causal
attention kernel (kernels/causal_attention.py, about twice as fast as SDPA's CPU flash kernel at these
lengths): no attention across examples, no compute on other examples' keys.

The switch is scoped to the thread that trains. `packed_attention_enabled` points the model's config at
`PACKED_ATTENTION` (the first thread to enter does it, the last to leave undoes it), and the function
registered under that name runs the packed path only in a thread inside the block. Any other thread
using the same model at the same time (generation, serving) gets the implementation the model had
before, with the mask that implementation expects: its outputs never change."""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from lorakit.kernels.causal_attention import causal_attention
from lorakit.kernels.dropout import dropout as hash_dropout
from lorakit.train.fused import lean_blocks_active

PACKED_ATTENTION = "lorakit_packed"
SEQ_LENS_KWARG = "lorakit_seq_lens"
BMM_ATTENTION_MAX_LEN = 1024
"""Longer examples go to SDPA's flash kernel: the bmm kernel keeps ~L^2/2 attention probabilities per
head for backward (a 1,024-token example: 9 MB per layer for 9 heads), flash only O(L)."""


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, H_kv, T, D)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, Any]:
    """The attention function registered as `PACKED_ATTENTION`: packed rows in a training thread, the
    model's own implementation everywhere else."""
    if not packed_attention_active():
        return _fallback_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return _packed_rows(module, query, key, value, dropout, scaling, **kwargs)


def _packed_rows(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 dropout: float, scaling: float | None, **kwargs) -> tuple[torch.Tensor, None]:
    seq_lens: list[list[int]] | None = kwargs.get(SEQ_LENS_KWARG)
    if seq_lens is None:
        seq_lens = [[query.shape[2]]] * query.shape[0]
    dropout = dropout if module.training else 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # unbind/split rather than slicing: their backward is one stack/cat, where every slice's backward
    # would allocate and fill a zero tensor of the whole input.
    rows = []
    for q, k, v, lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), seq_lens):  # (H, T, D) each
        pieces = [
            _one_example(qs, ks, vs, scale, dropout).transpose(0, 1)  # (L, H, D)
            for qs, ks, vs in zip(q.split(lengths, dim=1), k.split(lengths, dim=1), v.split(lengths, dim=1))
        ]
        rows.append(torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0].contiguous())
    return torch.stack(rows), None  # (B, T, H, D), as transformers expects


def _one_example(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: float) -> torch.Tensor:
    """(H, L, D) attention output of one example; attention dropout needs SDPA's own kernel."""
    if dropout or q.shape[1] > BMM_ATTENTION_MAX_LEN:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=True)[0]
    return causal_attention(q, k, v, scale)


_local = threading.local()  # .depth: how many packed_attention_enabled blocks this thread is inside
_lock = threading.Lock()
_users: dict[int, int] = {}  # id(config) -> threads inside the block for that model
_fallbacks: dict[int, str] = {}  # id(config) -> the implementation the model had before (kept after exit:
# a thread that read PACKED_ATTENTION just before the last one left still finds it)


def packed_attention_active() -> bool:
    """True in a thread inside `packed_attention_enabled` (a training step)."""
    return getattr(_local, "depth", 0) > 0


def _fallback_name(config: Any) -> str:
    return _fallbacks.get(id(config), "sdpa")


def _fallback_attention(module: nn.Module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, Any]:
    """The attention the model had before training switched it (eager through its own module's function)."""
    name = _fallback_name(module.config)
    if name == "eager":
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    else:
        function = AttentionInterface._global_mapping.get(name)
    return (function or sdpa_attention_forward)(module, query, key, value, attention_mask, **kwargs)


def _packed_mask(*args, config: Any = None, **kwargs):
    """Mask function registered for `PACKED_ATTENTION`: none in training (examples are split by
    seq_lens); for every other thread, the mask of the implementation the model had before."""
    if packed_attention_active():
        return None
    function = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(_fallback_name(config), sdpa_mask)
    return function(*args, config=config, **kwargs)


_registered = False


def register_packed_attention() -> None:
    global _registered
    if _registered:
        return
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    _registered = True


@contextmanager
def packed_attention_enabled(model: nn.Module) -> Iterator[None]:
    """Route this thread's attention through `_packed_rows` inside the block (training steps only);
    other threads running `model` meanwhile keep its own attention and masks."""
    register_packed_attention()
    config = model.config
    key = id(config)
    with _lock:
        if _users.get(key, 0) == 0:
            before = config._attn_implementation
            _fallbacks[key] = before if before != PACKED_ATTENTION else "sdpa"
            config._attn_implementation = PACKED_ATTENTION
        _users[key] = _users.get(key, 0) + 1
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        with _lock:
            _users[key] -= 1
            if _users[key] == 0:
                del _users[key]
                config._attn_implementation = _fallbacks[key]


# --- SDPA with lorakit's dropout, for encoders trained with attention dropout ----------------------
DROPOUT_SDPA = "lorakit_sdpa"
"""SDPA everywhere, except attention dropout in a training thread on the CPU: there SDPA falls back to
its math path and draws the dropout mask from torch's serial generator (1.4 ms forward for a
(16, 12, 40, 40) bf16 probability tensor on 2 cores); this path draws it from kernels/dropout.py."""


def dropout_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function registered as `DROPOUT_SDPA`: q, k, v (B, H, T, D) -> (B, T, H, D)."""
    if (not dropout or not lean_blocks_active() or query.device.type != "cpu" or key.shape[1] != query.shape[1]
            or getattr(module, "is_causal", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # Scale the (B, H, T, D) query rather than the (B, H, T, T) scores, and mask in place: at T = 128 each
    # (B, H, T, T) temporary is 6 MB per layer.
    scores = torch.matmul(query * scale, key.transpose(-1, -2))  # (B, H, T, T)
    if attention_mask is not None:  # SDPA's mask: bool (True = attend) or additive
        scores = scores.masked_fill_(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool else scores.add_(attention_mask)
    probs = torch.softmax(scores, dim=-1)  # computed in fp32 per row, kept in bf16 for backward
    return torch.matmul(hash_dropout(probs, dropout), value).transpose(1, 2).contiguous(), None


def register_dropout_sdpa() -> str:
    """Register `DROPOUT_SDPA` (with SDPA's masks) once; returns the name to load models with."""
    if DROPOUT_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(DROPOUT_SDPA, dropout_sdpa)
        AttentionMaskInterface.register(DROPOUT_SDPA, sdpa_mask)
    return DROPOUT_SDPA
