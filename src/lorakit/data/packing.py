"""Pack tokenized examples into rows of exactly `max_seq_len` tokens, never splitting an example.

Bin packing is best-fit decreasing: examples sorted longest first, each placed in the open row
whose free space it fills most tightly (a sorted list of free spaces, so O(n log n)). On lengths
uniform in 64..512 with rows of 512 this fills ~98-99% of the slots.

A row's `seq_lens` lists its examples' lengths in order; the training loop attends within each
piece only (no attention across examples) and `position_ids` restart at 0 for each. Slots no
example fits into are filled with pad tokens labelled -100, listed as one more piece of their own,
with position ids 0..k-1, so every row's `seq_lens` sums to `max_seq_len`.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Sequence

from lorakit.data.tokenize import IGNORE_INDEX, TokenizedExample
from lorakit.errors import LorakitError


@dataclass(frozen=True)
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]
    """Lengths of the pieces in order; the last is the pad filler when `padding` > 0."""
    padding: int
    """Pad tokens at the row's end (0 when examples fill it exactly)."""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PackStats:
    rows: int
    examples: int
    tokens: int
    """Tokens of examples (useful tokens)."""
    slots: int

    @property
    def efficiency(self) -> float:
        """Useful tokens / total slots."""
        return self.tokens / self.slots if self.slots else 0.0

    def __str__(self) -> str:
        return f"{self.examples} examples in {self.rows} rows of {self.slots // max(self.rows, 1)}: {self.efficiency:.1%} of slots used"


def pack(
    examples: Sequence[TokenizedExample], max_seq_len: int, pad_token_id: int, seed: int = 0, epoch: int = 0
) -> tuple[list[PackedRow], PackStats]:
    """Rows of exactly `max_seq_len` tokens holding every example whole, and how full they are.

    The examples are shuffled with (`seed`, `epoch`) first, which decides ties between equal
    lengths and so which examples share a row: each epoch gets different rows, and the same
    (seed, epoch) always the same rows, so a resumed run rebuilds them exactly. Rows come out in a
    shuffled order too.

    Raises:
        LorakitError: an example longer than `max_seq_len` (truncate when tokenizing).
    """
    too_long = [i for i, e in enumerate(examples) if len(e) > max_seq_len]
    if too_long:
        raise LorakitError(f"{len(too_long)} example(s) are longer than max_seq_len={max_seq_len} (first: #{too_long[0]}, {len(examples[too_long[0]])} tokens); truncate them when tokenizing")
    rng = random.Random(f"lorakit-pack:{seed}:{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    bins = best_fit_decreasing([len(examples[i]) for i in order], max_seq_len)
    rows = [_build_row([examples[order[i]] for i in members], max_seq_len, pad_token_id) for members in bins]
    rng.shuffle(rows)
    tokens = sum(len(e) for e in examples)
    return rows, PackStats(len(rows), len(examples), tokens, len(rows) * max_seq_len)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of `capacity`, each bin listed longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep the given order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        spot = bisect.bisect_left(free, (lengths[i], -1))
        if spot == len(free):
            bins.append([i])
            left, index = capacity - lengths[i], len(bins) - 1
        else:
            left, index = free.pop(spot)
            bins[index].append(i)
            left -= lengths[i]
        if left > 0:
            bisect.insort(free, (left, index))
    return bins


def _build_row(members: list[TokenizedExample], max_seq_len: int, pad_token_id: int) -> PackedRow:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in members:
        input_ids += example.input_ids
        labels += example.labels
        position_ids += range(len(example))
    seq_lens = [len(e) for e in members]
    padding = max_seq_len - len(input_ids)
    if padding:
        input_ids += [pad_token_id] * padding
        labels += [IGNORE_INDEX] * padding
        position_ids += range(padding)
        seq_lens.append(padding)
    return PackedRow(input_ids, labels, position_ids, seq_lens, padding)


def pad_rows(examples: Sequence[TokenizedExample], max_seq_len: int, pad_token_id: int) -> tuple[list[PackedRow], PackStats]:
    """One example per row, padded to `max_seq_len`: the no-packing baseline in the packed rows' format."""
    too_long = [i for i, e in enumerate(examples) if len(e) > max_seq_len]
    if too_long:
        raise LorakitError(f"{len(too_long)} example(s) are longer than max_seq_len={max_seq_len}; truncate them when tokenizing")
    rows = [_build_row([example], max_seq_len, pad_token_id) for example in examples]
    tokens = sum(len(e) for e in examples)
    return rows, PackStats(len(rows), len(examples), tokens, len(rows) * max_seq_len)
