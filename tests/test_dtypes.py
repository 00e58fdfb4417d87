"""The one table of dtype names: every spelling parses, unknown names are one-line errors, and names
round-trip with what transformers writes in config.json."""

from __future__ import annotations

import pytest
import torch

from lorakit.dtypes import DTYPES, dtype_name, parse_dtype
from lorakit.errors import LorakitError


@pytest.mark.parametrize("name, dtype", [
    ("float32", torch.float32), ("fp32", torch.float32),
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
    ("float16", torch.float16), ("fp16", torch.float16),
])
def test_every_spelling_parses(name, dtype):
    assert parse_dtype(name) is dtype
    assert parse_dtype(name.upper()) is dtype  # config files and flags are case-insensitive


def test_the_table_has_a_long_and_a_short_name_per_dtype():
    assert set(DTYPES.values()) == {torch.float32, torch.bfloat16, torch.float16}
    for dtype in DTYPES.values():
        assert sum(1 for d in DTYPES.values() if d is dtype) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float64])
def test_a_torch_dtype_passes_through(dtype):
    assert parse_dtype(dtype) is dtype


@pytest.mark.parametrize("name", ["int8", "float64", "bf", "", "auto", "torch.bfloat16"])
def test_an_unknown_name_is_a_one_line_error_listing_the_known_ones(name):
    with pytest.raises(LorakitError) as caught:
        parse_dtype(name)
    message = str(caught.value)
    assert repr(name) in message and "\n" not in message
    assert all(known in message for known in DTYPES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_name_is_what_transformers_writes_and_parses_back(dtype):
    from transformers import LlamaConfig

    written = LlamaConfig(dtype=dtype).to_dict()["dtype"]
    assert dtype_name(dtype) == written
    assert parse_dtype(dtype_name(dtype)) is dtype


def test_dtype_name_uses_the_long_names():
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name(torch.float16) == "float16"
    assert dtype_name(parse_dtype("fp32")) == "float32"
