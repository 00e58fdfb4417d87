"""Load a transformers causal LM and its tokenizer by name: a shipped model ("default", "gemma3-270m"),
a local directory, or a local GGUF file (converted once into the cache); never the hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from lorakit.dtypes import parse_dtype
from lorakit.errors import LorakitError
from lorakit.models.attention import choose_attn_implementation
from lorakit.models.classifier import check_can_generate
from lorakit.models.default import DEFAULT_NAME, default_model_dir
from lorakit.models.gemma3 import GEMMA3_NAME, gemma3_model_dir
from lorakit.models.gguf import gguf_model_dir, is_gguf_name
from lorakit.quant.config import QuantConfig
from lorakit.quant.load import load_quantized

SHIPPED_MODELS: dict[str, Callable[[], Path]] = {DEFAULT_NAME: default_model_dir, GEMMA3_NAME: gemma3_model_dir}
"""Names that need no path: each one's model directory, converted into the cache on first use."""


def resolve_model_dir(name_or_dir: str | os.PathLike) -> Path:
    """A shipped model's name -> its cached directory; a .gguf file -> its converted directory;
    otherwise a local directory with a config.json.

    Raises:
        LorakitError: a missing directory or file, a directory without config.json, or a GGUF
            transformers cannot read.
    """
    if str(name_or_dir) in SHIPPED_MODELS:
        return SHIPPED_MODELS[str(name_or_dir)]()
    path = Path(name_or_dir).expanduser()
    if (path / "config.json").is_file():
        return path
    if is_gguf_name(path) and not path.is_dir():
        return gguf_model_dir(path)
    if path.exists():
        raise LorakitError(f"{path} has no config.json; point at a transformers model directory (save_pretrained output) or a .gguf file")
    raise LorakitError(
        f"model {str(name_or_dir)!r} is not a local directory and the Hugging Face hub is unreachable from here; "
        f"use {', '.join(repr(n) for n in SHIPPED_MODELS)}, a local model directory or a .gguf file"
    )


def attn_implementation_for(path: Path) -> str:
    """SDPA when the model's class supports it, eager otherwise (models/attention.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return choose_attn_implementation(AutoConfig.from_pretrained(str(path), local_files_only=True), AutoModelForCausalLM)


def load_model(name_or_dir: str | os.PathLike = DEFAULT_NAME, dtype: str | torch.dtype | None = torch.float32,
               attn_implementation: str | None = None, quantization: QuantConfig | str | None = None, **kwargs):
    """A transformers AutoModelForCausalLM from a shipped name, a local directory or a .gguf file;
    never touches the network.

    `attn_implementation` None chooses per model: SDPA where the class supports it, eager where not
    (Gemma 2's softcapping, gpt-oss's sinks). `quantization` ("nf4" | "fp4" | "int8" or a QuantConfig)
    loads the base through bitsandbytes; the layers it leaves unquantized are then held in the config's
    compute dtype (`dtype` is ignored).

    Raises:
        LorakitError: no such model, a model that cannot generate (an encoder, a saved classifier),
            or an unknown dtype name.
    """
    from transformers import AutoModelForCausalLM  # here: transformers' model classes cost seconds to import
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_dir(name_or_dir)
    check_can_generate(path)
    attn_implementation = attn_implementation or attn_implementation_for(path)
    quant = QuantConfig.coerce(quantization) if quantization is not None else None
    if quant is not None and quant.enabled:
        return load_quantized(path, quant, attn_implementation=attn_implementation, **kwargs)
    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, attn_implementation=attn_implementation,
                                                local_files_only=True, **kwargs)


def load_tokenizer(name_or_dir: str | os.PathLike = DEFAULT_NAME):
    """The model's tokenizer, with the EOS token as padding when it has no pad token."""
    from transformers import AutoTokenizer  # here: see load_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(name_or_dir)), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
