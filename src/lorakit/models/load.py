"""Load a transformers causal LM and its tokenizer from a local directory or "default"."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.models.default import DEFAULT_NAME, default_model_dir

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_model_dir(name_or_dir: str | os.PathLike) -> Path:
    """"default" -> the cached default model; otherwise a local directory with a config.json."""
    if str(name_or_dir) == DEFAULT_NAME:
        return default_model_dir()
    path = Path(name_or_dir).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.exists():
        raise LorakitError(f"{path} has no config.json; point at a transformers model directory (save_pretrained output)")
    raise LorakitError(
        f"model {str(name_or_dir)!r} is not a local directory and the Hugging Face hub is unreachable from here; "
        "use 'default' or a local model directory"
    )


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LorakitError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(name_or_dir: str | os.PathLike = DEFAULT_NAME, dtype: str | torch.dtype | None = torch.float32, attn_implementation: str = "sdpa", quantization=None, **kwargs):
    """A transformers AutoModelForCausalLM from a local directory; never touches the network.

    `quantization` ("nf4" | "fp4" | "int8" or a lorakit.quant.QuantConfig) loads the base through
    bitsandbytes; the layers it leaves unquantized are then held in the config's compute dtype."""
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_dir(name_or_dir)
    # --- quantized base (lorakit.quant) ---
    if quantization is not None:
        from lorakit.quant.config import QuantConfig
        from lorakit.quant.load import load_quantized

        quant = QuantConfig.coerce(quantization)
        if quant.enabled:
            return load_quantized(path, quant, attn_implementation=attn_implementation, **kwargs)
    # --- end quantized base ---
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=parse_dtype(dtype), attn_implementation=attn_implementation, local_files_only=True, **kwargs)
    return model


def load_tokenizer(name_or_dir: str | os.PathLike = DEFAULT_NAME):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(name_or_dir)), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
