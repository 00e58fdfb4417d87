"""Batches have the documented shapes, and resuming at batch k gives batch k exactly."""

import pytest
import torch

from lorakit.data import IGNORE_INDEX, TokenizedExample, batches, collate_padded, num_batches, pack, padded_batches
from lorakit.errors import LorakitError


def rows_for_test(n: int = 50, seq_len: int = 64):
    examples = [TokenizedExample(list(range(3, 3 + k)), [IGNORE_INDEX] * 2 + list(range(5, 3 + k))) for k in range(5, 5 + n)]
    rows, _ = pack([e for e in examples if len(e) <= seq_len], seq_len, pad_token_id=0)
    return rows


def test_batch_format():
    rows = rows_for_test()
    batch = next(batches(rows, batch_size=4))
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].shape == (4, 64) and batch[key].dtype == torch.long
    assert len(batch["seq_lens"]) == 4 and all(sum(lens) == 64 for lens in batch["seq_lens"])


def test_resume_at_batch_k_is_identical():
    rows = rows_for_test()
    full = list(batches(rows, batch_size=3, seed=7, epoch=2))
    resumed = list(batches(rows, batch_size=3, seed=7, epoch=2, start=4))
    assert len(full) == num_batches(len(rows), 3) and len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed):
        assert a["seq_lens"] == b["seq_lens"]
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(a[key], b[key])


def test_epochs_are_shuffled_differently():
    rows = rows_for_test()
    first = next(batches(rows, 4, seed=0, epoch=0))["input_ids"]
    second = next(batches(rows, 4, seed=0, epoch=1))["input_ids"]
    assert not torch.equal(first, second)


def test_drop_last():
    rows = rows_for_test()
    assert all(len(b["seq_lens"]) == 5 for b in batches(rows, 5, drop_last=True))


def test_padded_collate_pads_to_the_longest():
    examples = [TokenizedExample([7, 8, 9], [-100, 8, 9]), TokenizedExample([7, 8, 9, 10, 11], [-100, -100, 9, 10, 11])]
    batch = collate_padded(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 0, 0], [7, 8, 9, 10, 11]]
    assert batch["labels"].tolist() == [[-100, 8, 9, -100, -100], [-100, -100, 9, 10, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["seq_lens"] == [[3, 2], [5]]


def test_padded_batches_resume():
    examples = [TokenizedExample([1] * k, [1] * k) for k in range(1, 20)]
    full = list(padded_batches(examples, 4, pad_token_id=0, seed=1))
    resumed = list(padded_batches(examples, 4, pad_token_id=0, seed=1, start=2))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full[2:], resumed))


def test_resume_past_the_end_is_refused():
    with pytest.raises(LorakitError, match="cannot resume at batch 99"):
        batches(rows_for_test(), 4, start=99)
