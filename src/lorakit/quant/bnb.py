"""Importing bitsandbytes quietly: the one place lorakit imports it for a check or a load.

Imports nothing from lorakit, so `quant/config.py` (platform checks) and `quant/load.py` can both use it
without importing each other."""

from __future__ import annotations

import logging
from types import ModuleType


def import_bitsandbytes() -> ModuleType:
    """`import bitsandbytes`, without its warning about an optional hub kernel (see quiet_bitsandbytes)."""
    with quiet_bitsandbytes():
        import bitsandbytes  # here, not at the top: it takes ~1 s and only quantized runs need it
    return bitsandbytes


class quiet_bitsandbytes:
    """Silence bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" line: that
    optional kernel wants a hub download, and the built-in path it falls back to is the one lorakit uses."""

    def __enter__(self) -> None:
        self._logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._logger.setLevel(self._level)
