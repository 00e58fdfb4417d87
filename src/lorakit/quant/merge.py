"""Moved: the quantization record lives in quant/record.py, merging in lorakit/merge/.

Kept only so `from lorakit.quant.merge import write_quant_record` (train/run.py) keeps working until it
imports from lorakit.quant.record; delete this file then."""

from lorakit.quant.record import QUANT_RECORD, read_quant_record, write_quant_record

__all__ = ["QUANT_RECORD", "read_quant_record", "write_quant_record"]
