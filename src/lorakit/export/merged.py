"""`lorakit merge --gguf`: adapter + base -> one GGUF model file for llama.cpp / Ollama.

The base is loaded as the adapter was trained on it and merged densely (merge/, the same path as a
merged model directory), in fp32 for q8_0 / f32 so the weights are rounded once, into Q8_0's blocks."""

from __future__ import annotations

import os

import torch

from lorakit.errors import LorakitError
from lorakit.export.gguf_model import MODEL_TYPES, ModelExport, write_model_gguf
from lorakit.export.writing import tensor_type
from lorakit.merge.dense import merge_to_dense
from lorakit.merge.directory import load_adapted_base
from lorakit.models.load import load_tokenizer, resolve_model_dir
from lorakit.quant.config import QuantConfig
from lorakit.quant.record import read_quant_record

MERGE_DTYPES = {"q8_0": torch.float32, "f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def merge_to_gguf(base: str | os.PathLike, adapter_dir: str | os.PathLike, out_path: str | os.PathLike, kind: str = "q8_0",
                  quantization: QuantConfig | str | None = None) -> ModelExport:
    """Merge `adapter_dir` into `base` and write the result as a GGUF of `kind` (q8_0 | bf16 | f16 | f32).

    Raises:
        LorakitError: an unknown kind, a base without a tokenizer, or what gguf_model refuses.
    """
    tensor_type(kind, MODEL_TYPES)  # refuse a bad kind before loading anything
    directory = resolve_model_dir(base)
    try:
        tokenizer = load_tokenizer(base)
    except (OSError, ValueError) as err:
        raise LorakitError(f"{directory} has no tokenizer a GGUF could carry ({err}); save the tokenizer beside the model") from None
    quant = QuantConfig.coerce(quantization) if quantization is not None else (read_quant_record(adapter_dir) or QuantConfig())
    model, _ = load_adapted_base(base, adapter_dir, quant)
    merged = merge_to_dense(model, MERGE_DTYPES[kind])
    return write_model_gguf(merged, tokenizer, directory, out_path, kind, name=str(base) if str(base) != "default" else directory.name)
