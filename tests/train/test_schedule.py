"""Learning-rate schedule: linear warm-up, then cosine / linear / constant decay to zero."""

import math

import pytest

from lorakit.train.schedule import lr_at, warmup_steps_for


def test_warmup_rises_linearly_to_the_peak():
    assert [lr_at(s, 1.0, 10, 4) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("kind, middle", [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)])
def test_decay_after_warmup(kind, middle):
    total, warmup = 12, 2
    assert lr_at(warmup, 2.0, total, warmup, kind) == pytest.approx(2.0)
    assert lr_at(warmup + 5, 2.0, total, warmup, kind) == pytest.approx(2.0 * middle)  # half-way through the decay
    assert lr_at(total, 2.0, total, warmup, kind) == pytest.approx(0.0 if kind != "constant" else 2.0)


def test_cosine_follows_the_formula_and_never_goes_below_zero():
    for step in range(0, 30):
        expected = 0.5 * (1 + math.cos(math.pi * min(1.0, step / 20)))
        assert lr_at(step, 1.0, 20, 0) == pytest.approx(expected)
        assert lr_at(step, 1.0, 20, 0) >= 0


def test_warmup_steps_override_the_ratio():
    assert warmup_steps_for(100, 0, 0.03) == 3
    assert warmup_steps_for(100, 7, 0.03) == 7
    assert warmup_steps_for(10, 0, 0.0) == 0
