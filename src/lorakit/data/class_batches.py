"""Classification examples -> padded batches grouped by length (no packing: one example per row).

A batch is a dict:
    input_ids       (B, T) long, right-padded to the longest example of the batch
    attention_mask  (B, T) long, 1 on real tokens
    token_type_ids  (B, T) long, 0 / 1 for the two texts of a pair (tokenizers that have them: BERT)
    labels          (B,) long, class ids
    padding         list[int]: per row, its pad tokens (for useful-token counts)

Length grouping: each epoch shuffles the examples (seeded), sorts every window of `window` batches by
length and cuts it into batches, then shuffles the batch order. Rows of a batch have similar lengths,
so little compute goes to padding, while the order stays random across windows and epochs. The same
(seed, epoch) gives the same batches, so a checkpoint's (epoch, batch index) resumes exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from lorakit.data.classify import ClassRecord
from lorakit.errors import LorakitError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class ClassExample:
    input_ids: list[int]
    label: int
    token_type_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_class(records: Sequence[ClassRecord], label_ids: Sequence[int] | None, tokenizer, max_seq_len: int) -> list[ClassExample]:
    """Tokenize texts (and pairs) with the tokenizer's special tokens, truncated to `max_seq_len`.
    `label_ids` None (prediction) gives label -1."""
    texts = [r.text for r in records]
    pairs = [r.text_pair for r in records]
    has_pairs = any(p is not None for p in pairs)
    encoded = tokenizer(texts, [p or "" for p in pairs] if has_pairs else None, truncation=True, max_length=max_seq_len)
    types = encoded.get("token_type_ids")
    labels = list(label_ids) if label_ids is not None else [-1] * len(records)
    return [ClassExample(list(ids), label, list(types[i]) if types is not None else None)
            for i, (ids, label) in enumerate(zip(encoded["input_ids"], labels))]


def collate_class(examples: Sequence[ClassExample], pad_token_id: int) -> dict:
    """Right-pad to the longest example of the batch."""
    width = max(len(e) for e in examples)
    pads = [width - len(e) for e in examples]
    batch = {
        "input_ids": torch.tensor([e.input_ids + [pad_token_id] * p for e, p in zip(examples, pads)], dtype=torch.long),
        "attention_mask": torch.tensor([[1] * len(e) + [0] * p for e, p in zip(examples, pads)], dtype=torch.long),
        "labels": torch.tensor([e.label for e in examples], dtype=torch.long),
        "padding": pads,
    }
    if examples[0].token_type_ids is not None:
        batch["token_type_ids"] = torch.tensor([e.token_type_ids + [0] * p for e, p in zip(examples, pads)], dtype=torch.long)
    return batch


def model_inputs(batch: dict) -> dict:
    """The forward's keyword arguments of a batch (training and inference alike): the mask only where
    some row is padded, so an unpadded batch takes SDPA's unmasked (flash) kernel."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "padding" in batch and not any(batch["padding"]):
        inputs.pop("attention_mask", None)
    return inputs


def length_grouped_indices(lengths: Sequence[int], batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                           window: int = 50) -> list[list[int]]:
    """Index groups of one epoch (see the module docstring); without `shuffle`: sorted by length, longest first."""
    if batch_size < 1:
        raise LorakitError(f"batch_size must be >= 1 (got {batch_size})")
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: -lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(f"lorakit-length-groups:{seed}:{epoch}")
    rng.shuffle(order)
    span = batch_size * window
    groups = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        groups += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(groups)
    return groups


@dataclass(frozen=True)
class LengthGroupedBatches:
    """The loop's batcher for classification: `batcher(examples, batch_size, seed=, epoch=, start=, shuffle=)`
    yields padded batches from batch index `start` of the epoch."""

    pad_token_id: int

    def __call__(self, examples: Sequence[ClassExample], batch_size: int, seed: int = 0, epoch: int = 0, start: int = 0,
                 shuffle: bool = True) -> Iterator[dict]:
        groups = length_grouped_indices([len(e) for e in examples], batch_size, seed, epoch, shuffle)
        if not 0 <= start <= len(groups):
            raise LorakitError(f"cannot resume at batch {start}: this epoch has {len(groups)} batches")
        return (collate_class([examples[i] for i in group], self.pad_token_id) for group in groups[start:])
