"""The root conftest's tiny-model helpers, loaded by path, and the single-thread fixture.

A sub-directory conftest.py (tests/data/conftest.py) takes the module name `conftest` during
collection, so `from conftest import ...` in a directory collected after it finds the wrong module."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

import pytest
import torch

_spec = importlib.util.spec_from_file_location("lorakit_tests_root_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)

make_tiny_llama = _root.make_tiny_llama
make_tiny_gpt2 = _root.make_tiny_gpt2
randomize_lora_b = _root.randomize_lora_b


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny tensors run ~1000x faster on one thread than on OpenMP threads contending for 2 busy cores.

    Autouse in every module that imports it; the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
