"""Load a transformers causal LM and its tokenizer from a local directory or "default"."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lorakit.dtypes import parse_dtype
from lorakit.errors import LorakitError
from lorakit.models.default import DEFAULT_NAME, default_model_dir
from lorakit.models.classifier import check_can_generate
from lorakit.quant.config import QuantConfig
from lorakit.quant.load import load_quantized


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


def load_model(name_or_dir: str | os.PathLike = DEFAULT_NAME, dtype: str | torch.dtype | None = torch.float32,
               attn_implementation: str = "sdpa", quantization: QuantConfig | str | None = None, **kwargs):
    """A transformers AutoModelForCausalLM from a local directory; never touches the network.

    `quantization` ("nf4" | "fp4" | "int8" or a QuantConfig) loads the base through bitsandbytes; the
    layers it leaves unquantized are then held in the config's compute dtype (`dtype` is ignored).

    Raises:
        LorakitError: no such model directory, a model that cannot generate (an encoder, a saved
            classifier), or an unknown dtype name.
    """
    from transformers import AutoModelForCausalLM  # here: transformers' model classes cost seconds to import
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_dir(name_or_dir)
    check_can_generate(path)
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
