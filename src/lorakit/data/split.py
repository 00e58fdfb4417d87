"""Deterministic train / eval split of validated records."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

from lorakit.errors import LorakitError

T = TypeVar("T")


def train_eval_split(items: Sequence[T], eval_fraction: float | None = None, eval_size: int | None = None, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split off an eval set, the same for the same seed; the train part keeps the file order.

    Give at most one of `eval_fraction` (of the records, rounded, at least 1) and `eval_size`;
    neither means no eval set.

    Raises:
        LorakitError: both given, a value out of range, or nothing would be left to train on.
    """
    if eval_fraction is not None and eval_size is not None:
        raise LorakitError("give eval_fraction or eval_size, not both")
    if eval_fraction is not None:
        if not 0 <= eval_fraction < 1:
            raise LorakitError(f"eval_fraction must be in [0, 1) (got {eval_fraction!r})")
        eval_size = max(1, round(len(items) * eval_fraction)) if eval_fraction > 0 else 0
    eval_size = eval_size or 0
    if eval_size < 0:
        raise LorakitError(f"eval_size must be >= 0 (got {eval_size})")
    if eval_size >= len(items) and eval_size > 0:
        raise LorakitError(f"eval set of {eval_size} leaves nothing to train on ({len(items)} record(s)); use a smaller eval_size / eval_fraction")
    chosen = set(random.Random(seed).sample(range(len(items)), eval_size))
    train = [item for i, item in enumerate(items) if i not in chosen]
    held = [items[i] for i in sorted(chosen)]
    return train, held
