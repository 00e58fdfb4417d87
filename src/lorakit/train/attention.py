"""Attention over packed rows: each example attends only to itself.

A packed row holds several examples back to back. A block-diagonal mask would push SDPA onto its slow
masked path on the CPU, so instead each example runs on its own slice through lorakit's causal
attention kernel (kernels/causal_attention.py, about twice as fast as SDPA's CPU flash kernel at these
lengths): no attention across examples, no compute on other examples' keys.

Families whose attention is more than causal softmax get it computed in full, per example: logit
softcapping (Gemma 2), attention sinks (gpt-oss) and a sliding window shorter than the example
(Mistral, Qwen2, Gemma 2 / 3, gpt-oss's sliding layers) or a chunk shorter than it (Llama 4's chunked
layers) run `_eager_example`, a plain-torch twin of transformers' eager attention with those terms; a
window or chunk at least as long as the example changes nothing and keeps the fast kernel. A module that attends both ways (`is_causal` False) is refused in
one line: packed rows are causal by construction.

The switch is scoped to the thread that trains. `packed_attention_enabled` points the model's config at
`PACKED_ATTENTION` (the first thread to enter does it, the last to leave undoes it), and the function
registered under that name runs the packed path only in a thread inside the block. Any other thread
using the same model at the same time (generation, serving) gets the implementation the model had
before, with the mask that implementation expects: its outputs never change."""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from lorakit.errors import LorakitError
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
    terms = _attention_terms(module, kwargs)
    # An fp32 model under bf16 autocast gives fp32 q and k (its rotary cos / sin are fp32) beside a bf16 v;
    # SDPA would cast all three to the autocast dtype, and the kernel needs them alike, so do the same.
    device = query.device.type
    autocasting = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # not on "meta"
    dtype = torch.get_autocast_dtype(device) if autocasting else value.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    # unbind/split rather than slicing: their backward is one stack/cat, where every slice's backward
    # would allocate and fill a zero tensor of the whole input.
    rows = []
    for q, k, v, lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), seq_lens):  # (H, T, D) each
        pieces = [
            _one_example(qs, ks, vs, scale, dropout, terms).transpose(0, 1)  # (L, H, D)
            for qs, ks, vs in zip(q.split(lengths, dim=1), k.split(lengths, dim=1), v.split(lengths, dim=1))
        ]
        rows.append(torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0].contiguous())
    return torch.stack(rows), None  # (B, T, H, D), as transformers expects


class AttentionTerms(NamedTuple):
    """What a family adds to causal softmax attention, as transformers passes it to the attention function."""

    softcap: float | None = None  # scores -> tanh(scores / softcap) * softcap (Gemma 2)
    sliding_window: int | None = None  # a query sees the last `sliding_window` positions, itself included
    sinks: torch.Tensor | None = None  # (H,) one extra logit per head that takes probability and no value (gpt-oss)
    chunk: int | None = None  # a query sees its own block of `chunk` positions only (Llama 4's chunked layers)


def _attention_terms(module: nn.Module, kwargs: dict) -> AttentionTerms:
    """The terms of `module`'s attention call.

    Raises:
        LorakitError: a module that attends both ways, which packed rows cannot express.
    """
    if getattr(module, "is_causal", True) is False:
        raise LorakitError(f"{type(module).__name__} attends in both directions (is_causal False), and packed training rows are "
                           "causal; train it as a classifier (task_type SEQ_CLS) or use a causal model")
    window = kwargs.get("sliding_window")
    return AttentionTerms(kwargs.get("softcap"), int(window) if window else None, kwargs.get("s_aux"), _chunk_size(module))


def _chunk_size(module: nn.Module) -> int | None:
    """Llama 4's chunked layers say so only through their mask, which packed rows replace: read the config."""
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    index = getattr(module, "layer_idx", None)
    if index is None or index >= len(layer_types) or layer_types[index] != "chunked_attention":
        return None
    return int(config.attention_chunk_size)


def _one_example(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: float,
                 terms: AttentionTerms = AttentionTerms()) -> torch.Tensor:
    """(H, L, D) attention output of one example; attention dropout needs SDPA's own kernel."""
    length = q.shape[1]
    window = terms.sliding_window if terms.sliding_window is not None and terms.sliding_window < length else None
    chunk = terms.chunk if terms.chunk is not None and terms.chunk < length else None
    if terms.softcap is not None or terms.sinks is not None or window is not None or chunk is not None:
        return _eager_example(q, k, v, scale, dropout, terms._replace(sliding_window=window, chunk=chunk))
    if dropout or length > BMM_ATTENTION_MAX_LEN:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=True)[0]
    return causal_attention(q, k, v, scale)


def _eager_example(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: float,
                   terms: AttentionTerms) -> torch.Tensor:
    """Causal attention of one example with softcapping, a sliding window, chunks and sinks, as transformers'
    eager functions and masks compute them (Gemma 2's, gpt-oss's): q (H, L, D), k / v (KVH, L, D) -> (H, L, D).
    It keeps the (H, L, L) probabilities for backward: the price of terms the fast kernels lack."""
    heads, length, _ = q.shape
    group = heads // k.shape[0]
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)  # kv head h // group, as repeat_kv
    scores = torch.matmul(q, k.transpose(1, 2)).float() * scale  # (H, L, L)
    if terms.softcap is not None:
        scores = torch.tanh(scores / terms.softcap) * terms.softcap
    positions = torch.arange(length, device=q.device)
    offset = positions[:, None] - positions[None, :]  # query - key
    allowed = offset >= 0
    if terms.sliding_window is not None:
        allowed &= offset < terms.sliding_window
    if terms.chunk is not None:
        blocks = positions // terms.chunk
        allowed &= blocks[:, None] == blocks[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    if terms.sinks is not None:
        sinks = terms.sinks.float().reshape(heads, 1, 1).expand(heads, length, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]  # the sink takes mass, gives nothing
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout) if dropout else probs
    return torch.matmul(probs.to(v.dtype), v)


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
