"""The sequence-classification objective: cross-entropy over class labels, one label per example.

    batch (length-grouped, right-padded; data/class_batches.py)
      -> AutoModelForSequenceClassification forward -> logits (B, C)
      -> cross_entropy(logits, labels, reduction="sum"), count = B

It plugs into the same `train_step` / `train` as the causal LM (`packed_rows = False`: padded rows,
ordinary attention). A batch with no padding at all drops its attention mask, so SDPA takes its
unmasked (flash) kernel; with length-grouped batches that is most batches of evenly sized data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.class_batches import model_inputs


@dataclass(frozen=True)
class SequenceClassification:
    """Summed cross-entropy of the logits against `labels` (B,); the count is the number of examples."""

    packed_rows: bool = False

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        logits = model(**model_inputs(batch)).logits  # (B, C)
        labels = batch["labels"]
        return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())

    def label_count(self, batch: dict) -> int:
        return int(batch["labels"].numel())


SEQ_CLS = SequenceClassification()
