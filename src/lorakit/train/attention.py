"""Attention over packed rows: each example attends only to itself.

A packed row holds several examples back to back. A block-diagonal mask would push SDPA onto its slow
masked path on the CPU, so instead each example runs through the flash kernel on its own slice with
`is_causal=True`: no mask, no attention across examples, no compute on other examples' keys."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "lorakit_packed"
SEQ_LENS_KWARG = "lorakit_seq_lens"


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
    # unbind/split rather than slicing: their backward is one stack/cat, where every slice's backward
    # would allocate and fill a zero tensor of the whole input.
    rows = []
    for q, k, v, lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), seq_lens):  # (H, T, D) each
        pieces = [
            F.scaled_dot_product_attention(
                qs[None], ks[None], vs[None], dropout_p=dropout if module.training else 0.0,
                is_causal=True, scale=scaling, enable_gqa=True,
            )
            for qs, ks, vs in zip(q.split(lengths, dim=1), k.split(lengths, dim=1), v.split(lengths, dim=1))
        ]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, D), as transformers expects


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
