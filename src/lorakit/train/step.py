"""One training step, shared by the loop, evaluation, the benches and the memory estimate.

    objective.loss_sum(model, batch)   -> summed loss over the batch's labels, and their count
    train_step(model, batch, normaliser, objective)
                                        -> forward under bf16 autocast on the model's device, then
                                           backward of loss_sum / normaliser

The normaliser is the label count of the whole optimizer step (all its micro-batches; under
data-parallel training, of all processes), which the caller passes: so accumulation and data
parallelism give the same update as one big batch. An `Objective` says what is learned: `CausalLM`
here (next-token loss through the chunked frozen head), `Classification` in train/classification.py
(cross-entropy over class labels)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Protocol

import torch
from torch import nn

from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.device import autocast, model_device, to_device
from lorakit.lora.model import unwrap_model
from lorakit.train.attention import SEQ_LENS_KWARG, packed_attention_enabled
from lorakit.train.fused import lean_blocks
from lorakit.train.loss import causal_lm_loss_sum


class Objective(Protocol):
    """What a model learns from a batch. `packed_rows`: the batches are packed rows (`seq_lens`, per-example
    positions) that need packed attention, as causal LM training uses; a padded-batch objective says False."""

    packed_rows: bool

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed loss over the batch's labels (a scalar with a graph when gradients are on), and their count."""
        ...

    def label_count(self, batch: dict) -> int:
        """How many labels `loss_sum` will sum over, known before the forward (for the step's normaliser)."""
        ...


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction on packed rows: decoder -> hidden states (B, T, C) -> chunked head loss,
    so the full (B, T, V) logits never exist."""

    packed_rows: bool = True

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        hf_model = unwrap_model(model)
        decoder = getattr(hf_model, hf_model.base_model_prefix)
        hidden = decoder(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
            **{SEQ_LENS_KWARG: batch["seq_lens"]},
        ).last_hidden_state  # (B, T, C)
        return causal_lm_loss_sum(hidden, batch["labels"], hf_model.get_output_embeddings())

    def label_count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


CAUSAL_LM = CausalLM()


class StepLoss(NamedTuple):
    loss_sum: torch.Tensor  # detached, fp32 scalar on the model's device
    count: int


@contextmanager
def training_paths(hf_model: nn.Module, packed: bool = True) -> Iterator[None]:
    """Packed per-example attention (`packed`) and the lean norm / MLP kernels, in this thread only.
    Hold it across backward too when layers are checkpointed: their recompute must take the same paths."""
    with (packed_attention_enabled(hf_model) if packed else nullcontext()), lean_blocks(hf_model):
        yield


def checkpoint_kwargs(hf_model: nn.Module, packed: bool = True) -> dict:
    """torch.utils.checkpoint arguments under which a checkpointed layer's recompute takes the training
    paths too: on CUDA, autograd runs backward (and so the recompute) on its own device threads, outside
    the thread-local `training_paths` of the training thread; `context_fn` re-enters them there."""
    return {"use_reentrant": False, "context_fn": lambda: (nullcontext(), training_paths(hf_model, packed))}


def forward_loss(model: nn.Module, batch: dict, objective: Objective = CAUSAL_LM, bf16: bool = True) -> tuple[torch.Tensor, int]:
    """`objective.loss_sum` on the model's device, under bf16 autocast and the training paths."""
    device = model_device(model)
    with autocast(device, bf16), training_paths(unwrap_model(model), packed=objective.packed_rows):
        return objective.loss_sum(model, to_device(batch, device))


def train_step(model: nn.Module, batch: dict, normaliser: float, objective: Objective = CAUSAL_LM, bf16: bool = True) -> StepLoss:
    """Forward one micro-batch and backpropagate its loss divided by `normaliser` (the label count of the
    whole optimizer step); gradients accumulate in the parameters' .grad. Returns the summed loss, detached."""
    loss_sum, count = forward_loss(model, batch, objective, bf16)
    (loss_sum / normaliser).backward()
    return StepLoss(loss_sum.detach(), count)


def batch_loss_sum(model: nn.Module, batch: dict, bf16: bool = True) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the batch's labelled tokens, and their count (`forward_loss` with the
    causal LM objective; kept for callers that want the loss without a backward)."""
    return forward_loss(model, batch, CAUSAL_LM, bf16)


def useful_tokens(batch: dict) -> int:
    """Tokens of real examples in the batch (row padding excluded)."""
    return int(batch["input_ids"].numel() - sum(batch.get("padding", [0])))


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[dict], bf16: bool = True, objective: Objective = CAUSAL_LM) -> float:
    """Mean loss over every label of `batches`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            loss_sum, n = forward_loss(model, batch, objective, bf16)
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)
