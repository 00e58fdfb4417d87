"""quant/record.py: the quantization record training leaves beside an adapter."""

from __future__ import annotations

import json

from lorakit.quant.config import QuantConfig
from lorakit.quant.record import QUANT_RECORD, read_quant_record, write_quant_record


def test_record_round_trips(tmp_path):
    write_quant_record(tmp_path, QuantConfig("nf4", double_quant=False, compute_dtype="float16"))
    assert json.loads((tmp_path / QUANT_RECORD).read_text())["quantization"] == "nf4"
    assert read_quant_record(tmp_path) == QuantConfig("nf4", double_quant=False, compute_dtype="float16")


def test_an_unquantized_base_leaves_no_record(tmp_path):
    write_quant_record(tmp_path, QuantConfig())
    assert not (tmp_path / QUANT_RECORD).exists() and read_quant_record(tmp_path) is None
