import pytest

from lorakit.data import train_eval_split
from lorakit.errors import LorakitError


def test_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, held = train_eval_split(items, eval_fraction=0.1, seed=5)
    assert (train, held) == train_eval_split(items, eval_fraction=0.1, seed=5)
    assert len(held) == 10 and sorted(train + held) == items
    assert train == sorted(train)  # the train part keeps file order
    assert train_eval_split(items, eval_fraction=0.1, seed=6)[1] != held


def test_eval_size_and_no_eval():
    assert len(train_eval_split(list(range(10)), eval_size=3)[1]) == 3
    assert train_eval_split([1, 2, 3]) == ([1, 2, 3], [])


def test_bad_split_settings():
    with pytest.raises(LorakitError, match="not both"):
        train_eval_split([1, 2], eval_fraction=0.5, eval_size=1)
    with pytest.raises(LorakitError, match="leaves nothing to train on"):
        train_eval_split([1, 2], eval_size=2)
