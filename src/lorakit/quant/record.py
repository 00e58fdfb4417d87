"""The quantization record: which quantized base an adapter was trained on.

Training writes it beside the adapter (peft ignores the extra file); `lorakit merge` reads it to load
the base exactly as the adapter saw it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit.io import atomic_write_text
from lorakit.quant.config import QuantConfig

QUANT_RECORD = "lorakit_quantization.json"


def write_quant_record(adapter_dir: str | os.PathLike, config: QuantConfig) -> None:
    """Note `config` beside the adapter files; nothing is written for an unquantized base."""
    if config.enabled:
        atomic_write_text(Path(adapter_dir) / QUANT_RECORD, json.dumps(config.to_dict(), indent=2) + "\n")


def read_quant_record(adapter_dir: str | os.PathLike) -> QuantConfig | None:
    """The recorded QuantConfig, or None when training left no record (a plain base)."""
    path = Path(adapter_dir) / QUANT_RECORD
    return QuantConfig.from_dict(json.loads(path.read_text())) if path.is_file() else None
