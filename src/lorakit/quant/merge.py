"""Merge an adapter trained on a quantized base into a dense model directory.

The base is dequantized (exactly, in fp32), the adapter added in fp32 and the sum written in the
dtype the user picks (bf16 by default). Nothing is re-quantized unless `requantize` asks for it, and
then the logit error that re-quantizing introduced is measured and reported. `lorakit merge` is a thin
shell over `merge_to_directory`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant.config import QuantConfig
from lorakit.quant.requantize import PROBE_PROMPTS, LogitError, dequantize_model, logit_error, probe_inputs, prompt_logits, requantize_model

QUANT_RECORD = "lorakit_quantization.json"
"""Written beside an adapter trained on a quantized base, so a merge knows which base it was trained on."""

MERGE_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "fp32": torch.float32, "float32": torch.float32}


def write_quant_record(adapter_dir: str | os.PathLike, config: QuantConfig) -> None:
    """Note `config` beside the adapter files (peft ignores the extra file)."""
    from lorakit.io import atomic_write_text

    if config.enabled:
        atomic_write_text(Path(adapter_dir) / QUANT_RECORD, json.dumps(config.to_dict(), indent=2) + "\n")


def read_quant_record(adapter_dir: str | os.PathLike) -> QuantConfig | None:
    path = Path(adapter_dir) / QUANT_RECORD
    return QuantConfig.from_dict(json.loads(path.read_text())) if path.is_file() else None


def merge_quantized(model: nn.Module, dtype: torch.dtype = torch.bfloat16, safe_merge: bool = True,
                    adapter_names: list[str] | None = None) -> nn.Module:
    """A LoraModel (on a quantized or plain base) as a dense transformers model in `dtype`: adapters
    folded in fp32 into the dequantized weights, every other quantized layer dequantized too."""
    from lorakit.lora.merge import merge_and_unload

    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    merged = merge_and_unload(inner, safe_merge=safe_merge, adapter_names=adapter_names, dtype=dtype)
    return dequantize_model(merged, dtype)


@dataclass
class MergeReport:
    out_dir: Path
    dtype: torch.dtype
    base: QuantConfig
    requantized: QuantConfig | None = None
    error: LogitError | None = None
    """Logits of the written model against the unmerged one (quantized base + adapter)."""
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        stored = self.requantized.describe() if self.requantized else str(self.dtype).replace("torch.", "")
        out = [f"merged model written to {self.out_dir} ({stored}; base was {self.base.describe()})"]
        if self.error is not None:
            what = f"error introduced by re-quantizing to {self.requantized.quantization}" if self.requantized else "logit difference"
            out.append(f"{what}: {self.error} (against the unmerged model)")
        return out + self.notes


def merge_to_directory(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype = "bf16",
    quantization: QuantConfig | str | None = None,
    requantize: QuantConfig | str | None = None,
    prompts: Sequence[str] | None = PROBE_PROMPTS,
) -> MergeReport:
    """Load `base` as the adapter was trained on it, merge, write a model directory transformers loads.

    Args:
        base: "default" or a local model directory.
        adapter_dir: a peft-format adapter.
        out_dir: written atomically (model, config, tokenizer).
        dtype: bf16 | fp16 | fp32, the dtype of the dense weights written.
        quantization: how the base was quantized in training; None reads the record training left
            beside the adapter (or, without one, uses the base as stored).
        requantize: nf4 | fp4 | int8 to write a quantized merged model instead (its error is measured).
        prompts: probe prompts for the logit comparison; None skips the measurement.
    """
    from lorakit.io import atomic_directory
    from lorakit.lora.model import LoraModel
    from lorakit.models.load import load_model, load_tokenizer
    from lorakit.quant.guard import keep_4bit_trainable
    from lorakit.quant.load import detect_quantization

    target_dtype = _merge_dtype(dtype)
    quant = QuantConfig.coerce(quantization) if quantization is not None else (read_quant_record(adapter_dir) or QuantConfig())
    again = QuantConfig.coerce(requantize) if requantize is not None else None
    if again is not None and not again.enabled:
        again = None
    base_model = load_model(base, dtype=torch.float32, quantization=quant if quant.enabled else None)
    keep_4bit_trainable(base_model)  # evaluate through the same matmul path as training, not the CPU repack
    quant = detect_quantization(base_model)  # also covers a base directory stored quantized
    model = LoraModel.from_pretrained(base_model, adapter_dir)
    try:
        tokenizer = load_tokenizer(base)
    except (OSError, ValueError, LorakitError):
        tokenizer = None
    probes = probe_inputs(tokenizer, prompts, model.config.vocab_size) if prompts else None
    reference = prompt_logits(model, probes) if probes else None

    merged = merge_quantized(model, target_dtype)
    report = MergeReport(Path(out_dir), target_dtype, quant, again)
    with atomic_directory(out_dir) as staging:
        final = merged
        if again is not None:
            again = QuantConfig(again.quantization, again.double_quant, _compute_name(target_dtype), again.skip_modules)
            report.requantized = again
            final = requantize_model(merged, again, work_dir=Path(out_dir).absolute().parent)
            del merged
        final.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        else:
            report.notes.append(f"{base} has no tokenizer: none was written, and the error was measured on random token ids")
    if reference is not None:
        report.error = logit_error(reference, prompt_logits(final, probes))
    return report


def _merge_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in MERGE_DTYPES.values():
            raise LorakitError(f"merge dtype {dtype} is not supported; use bf16, fp16 or fp32")
        return dtype
    if dtype not in MERGE_DTYPES:
        raise LorakitError(f"merge dtype {dtype!r} is unknown; use bf16, fp16 or fp32")
    return MERGE_DTYPES[dtype]


def _compute_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
