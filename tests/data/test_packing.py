"""Packing keeps every example whole, restarts position ids, and fills > 97% of the slots."""

import random

import pytest

from lorakit.data import IGNORE_INDEX, TokenizedExample, pack, pad_rows
from lorakit.errors import LorakitError

PAD = 2


def make_examples(n: int, low: int = 64, high: int = 512, seed: int = 0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    examples = []
    for index in range(n):
        length = rng.randint(low, high)
        ids = [1000 + index] * length  # every token names its example
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]))
    return examples


def split_row(row):
    start = 0
    for length in row.seq_lens:
        yield start, length
        start += length


def test_rows_hold_every_example_whole():
    examples = make_examples(300)
    rows, stats = pack(examples, 512, PAD)
    found = []
    for row in rows:
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids) == 512
        assert sum(row.seq_lens) == 512
        pieces = list(split_row(row))
        if row.padding:
            start, length = pieces.pop()
            assert length == row.padding
            assert row.input_ids[start:] == [PAD] * length and row.labels[start:] == [IGNORE_INDEX] * length
            assert row.position_ids[start:] == list(range(length))
        for start, length in pieces:
            example = examples[row.input_ids[start] - 1000]
            assert row.input_ids[start : start + length] == example.input_ids
            assert row.labels[start : start + length] == example.labels
            assert row.position_ids[start : start + length] == list(range(length))
            found.append(row.input_ids[start] - 1000)
    assert sorted(found) == list(range(300))
    assert stats.examples == 300 and stats.rows == len(rows) and stats.tokens == sum(map(len, examples))


def test_efficiency_above_97_percent_on_uniform_lengths():
    _, stats = pack(make_examples(2000), 512, PAD)
    assert stats.efficiency > 0.97, str(stats)


def test_same_seed_and_epoch_same_rows_otherwise_other_rows():
    examples = make_examples(200)
    first, _ = pack(examples, 512, PAD, seed=3, epoch=1)
    assert first == pack(examples, 512, PAD, seed=3, epoch=1)[0]
    assert first != pack(examples, 512, PAD, seed=4, epoch=1)[0]
    assert first != pack(examples, 512, PAD, seed=3, epoch=2)[0]


def test_exact_fit_has_no_filler():
    examples = [TokenizedExample([5] * 256, [5] * 256)] * 2
    [row], stats = pack(examples, 512, PAD)
    assert row.seq_lens == [256, 256] and row.padding == 0 and stats.efficiency == 1.0


def test_too_long_example_is_refused():
    with pytest.raises(LorakitError, match="longer than max_seq_len=8"):
        pack([TokenizedExample([1] * 9, [1] * 9)], 8, PAD)


def test_pad_rows_one_example_per_row():
    examples = make_examples(10, high=100)
    rows, stats = pad_rows(examples, 128, PAD)
    for row, example in zip(rows, examples):
        assert row.input_ids[: len(example)] == example.input_ids and row.seq_lens == [len(example), 128 - len(example)]
        assert row.position_ids == list(range(len(example))) + list(range(128 - len(example)))
    assert stats.rows == 10 and stats.efficiency == sum(map(len, examples)) / 1280
