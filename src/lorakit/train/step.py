"""One forward pass of a packed batch to a summed loss, shared by training and evaluation."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from lorakit.train.attention import SEQ_LENS_KWARG, packed_attention_enabled
from lorakit.train.fused import lean_blocks
from lorakit.train.loss import causal_lm_loss_sum


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a LoraModel (or the model itself)."""
    return getattr(model, "model", model) if hasattr(model, "peft_config") else model


@contextmanager
def training_paths(hf_model: nn.Module) -> Iterator[None]:
    """Packed per-example attention and the lean norm / MLP kernels, as a training step runs them.
    Hold it across backward too when layers are checkpointed: their recompute must take the same paths."""
    with packed_attention_enabled(hf_model), lean_blocks(hf_model):
        yield


def batch_loss_sum(model: nn.Module, batch: dict, bf16: bool = True) -> tuple[torch.Tensor, int]:
    """Summed loss over the batch's labelled tokens, and their count.

    Runs the decoder for hidden states (B, T, C), then the chunked head loss: the full (B, T, V)
    logits never exist. Norms and MLPs run on lorakit's lean kernels (train/fused.py)."""
    hf_model = transformers_model(model)
    decoder = getattr(hf_model, hf_model.base_model_prefix)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast, training_paths(hf_model):
        hidden = decoder(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
            **{SEQ_LENS_KWARG: batch["seq_lens"]},
        ).last_hidden_state  # (B, T, C)
        return causal_lm_loss_sum(hidden, batch["labels"], hf_model.get_output_embeddings())


def useful_tokens(batch: dict) -> int:
    """Tokens of real examples in the batch (row padding excluded)."""
    return int(batch["input_ids"].numel() - sum(batch.get("padding", [0])))


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches, bf16: bool = True) -> float:
    """Mean next-token loss over every labelled token of `batches`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            loss_sum, n = batch_loss_sum(model, batch, bf16)
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)
