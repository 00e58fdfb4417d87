"""The root conftest's tiny-model helpers, loaded by path.

A sub-directory conftest.py (tests/data/conftest.py) takes the module name `conftest` during
collection, so `from conftest import ...` in a directory collected after it finds the wrong module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("lorakit_tests_root_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)

make_tiny_llama = _root.make_tiny_llama
make_tiny_gpt2 = _root.make_tiny_gpt2
randomize_lora_b = _root.randomize_lora_b
