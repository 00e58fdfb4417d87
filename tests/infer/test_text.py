"""Streamed text and sampling settings."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.infer.sampling import SamplingParams, sample
from lorakit.infer.text import TextStream
from tests.helpers import ToyTokenizer


def feed(stream: TextStream, text: str) -> list[str]:
    return [stream.add(i) for i in ToyTokenizer().encode(text)]


def test_pieces_hold_back_what_could_start_a_stop_string() -> None:
    stream = TextStream(ToyTokenizer(), stop=("END",))
    pieces = feed(stream, "abcEN")
    assert "".join(pieces) == "abc"  # "EN" may become "END": held back
    assert stream.add(ToyTokenizer().encode("X")[0]) == "ENX"
    assert not stream.stopped


def test_a_stop_string_ends_the_text_before_it() -> None:
    stream = TextStream(ToyTokenizer(), stop=("ab", "END"))
    pieces = feed(stream, "xyzEND")
    assert stream.stopped and stream.text == "xyz" and "".join(pieces) == "xyz"


def test_sampling_settings_are_checked() -> None:
    with pytest.raises(LorakitError, match="top_p must be in"):
        SamplingParams(top_p=0).validate()
    with pytest.raises(LorakitError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=0).validate()


def test_top_k_and_top_p_keep_only_the_likely_tokens() -> None:
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])
    draws = {sample(logits, SamplingParams(temperature=1.0, top_k=2), torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {0, 1}
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {0}
