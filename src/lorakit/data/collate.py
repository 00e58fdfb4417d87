"""Batches of tensors from packed rows or from unpacked examples, in a seeded order that resumes.

A batch is a dict:
    input_ids     (B, T) long
    labels        (B, T) long, -100 where no loss is taken
    position_ids  (B, T) long, restarting at 0 for each piece
    seq_lens      list[list[int]]: per row, the lengths of its pieces (they sum to T); attention
                  stays within a piece. Padding is a piece of its own with all labels -100.
    padding       list[int]: per row, the pad tokens at its end (packed batches only).
Padded batches (`collate_padded`) also carry attention_mask (B, T) long, 1 on real tokens.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from lorakit.data.packing import PackedRow
from lorakit.data.tokenize import IGNORE_INDEX, TokenizedExample
from lorakit.errors import LorakitError

Item = TypeVar("Item")
Batch = dict


def collate_packed(rows: Sequence[PackedRow]) -> Batch:
    """Stack packed rows (all of one length) into a batch."""
    return {
        "input_ids": torch.tensor([r.input_ids for r in rows], dtype=torch.long),
        "labels": torch.tensor([r.labels for r in rows], dtype=torch.long),
        "position_ids": torch.tensor([r.position_ids for r in rows], dtype=torch.long),
        "seq_lens": [list(r.seq_lens) for r in rows],
        "padding": [r.padding for r in rows],
    }


def collate_padded(examples: Sequence[TokenizedExample], pad_token_id: int, pad_to_multiple_of: int = 1) -> Batch:
    """Right-pad examples to the longest in the batch (rounded up to `pad_to_multiple_of`)."""
    longest = max(len(e) for e in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids, labels, positions, mask, seq_lens = [], [], [], [], []
    for example in examples:
        n, pad = len(example), width - len(example)
        input_ids.append(example.input_ids + [pad_token_id] * pad)
        labels.append(example.labels + [IGNORE_INDEX] * pad)
        positions.append(list(range(n)) + list(range(pad)))
        mask.append([1] * n + [0] * pad)
        seq_lens.append([n, pad] if pad else [n])
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "seq_lens": seq_lens,
    }


def num_batches(n_items: int, batch_size: int, drop_last: bool = False) -> int:
    return n_items // batch_size if drop_last else -(-n_items // batch_size)


def batch_indices(n_items: int, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True, drop_last: bool = False) -> list[list[int]]:
    """The item indices of every batch of one epoch; the same (seed, epoch) gives the same batches."""
    if batch_size < 1:
        raise LorakitError(f"batch_size must be >= 1 (got {batch_size})")
    order = list(range(n_items))
    if shuffle:
        random.Random(f"lorakit-batches:{seed}:{epoch}").shuffle(order)
    groups = [order[i : i + batch_size] for i in range(0, n_items, batch_size)]
    if drop_last and groups and len(groups[-1]) < batch_size:
        groups.pop()
    return groups


def batches(
    rows: Sequence[PackedRow], batch_size: int, seed: int = 0, epoch: int = 0, start: int = 0, shuffle: bool = True, drop_last: bool = False
) -> Iterator[Batch]:
    """Batches of packed rows for one epoch, beginning at batch index `start`.

    Batch k is the same whether iteration began at 0 or at `start=k`, so a checkpoint that stores
    (epoch, next batch index) resumes exactly. The last batch may be smaller unless `drop_last`.
    """
    return _iterate(rows, collate_packed, batch_size, seed, epoch, start, shuffle, drop_last)


def padded_batches(
    examples: Sequence[TokenizedExample], batch_size: int, pad_token_id: int, seed: int = 0, epoch: int = 0, start: int = 0,
    shuffle: bool = True, drop_last: bool = False,
) -> Iterator[Batch]:
    """Like `batches`, for unpacked examples padded to the longest of each batch (eval, comparisons)."""
    return _iterate(examples, lambda items: collate_padded(items, pad_token_id), batch_size, seed, epoch, start, shuffle, drop_last)


def _iterate(items: Sequence[Item], collate: Callable[[list[Item]], Batch], batch_size: int, seed: int, epoch: int, start: int, shuffle: bool, drop_last: bool) -> Iterator[Batch]:
    groups = batch_indices(len(items), batch_size, seed, epoch, shuffle, drop_last)
    if not 0 <= start <= len(groups):
        raise LorakitError(f"cannot resume at batch {start}: this epoch has {len(groups)} batches")
    return (collate([items[i] for i in group]) for group in groups[start:])
