"""Shared fixtures: tiny models built from configs (no downloads), and the default model (slow)."""

from __future__ import annotations

import os
import warnings
from typing import Iterator

import pytest
import torch

from tests.helpers import make_tiny_gpt2, make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


@pytest.fixture(scope="session")
def default_model_dir():
    from lorakit.models.default import default_model_dir as resolve

    return resolve()


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (loads in a second or two)."""
    from lorakit import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(autouse=True)
def single_thread_for_tiny_models(request) -> Iterator[None]:
    """Tiny tensors run far faster on one thread than on OpenMP threads contending for 2 cores;
    tests marked slow (the default model) keep every thread."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

