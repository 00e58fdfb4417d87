"""Attention over packed rows: each example attends only to itself.

A packed row holds several examples back to back. A block-diagonal mask would push SDPA onto its slow
masked path on the CPU, so instead each example runs on its own slice through lorakit's causal
attention kernel (kernels/causal_attention.py, about twice as fast as SDPA's CPU flash kernel at these
lengths): no attention across examples, no compute on other examples' keys."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels.causal_attention import causal_attention

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
) -> tuple[torch.Tensor, None]:
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


def register_packed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@contextmanager
def packed_attention_enabled(model: nn.Module) -> Iterator[None]:
    """Route the model's attention through `packed_attention` inside the block (training steps only:
    generation with padding masks keeps transformers' own SDPA path)."""
    register_packed_attention()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
