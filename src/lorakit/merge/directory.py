"""`lorakit merge`: adapter + base -> a model directory transformers loads without lorakit.

The base is loaded as the adapter was trained on it (the quantization record beside the adapter says
how), merged densely (merge/dense.py) and written in the dtype the user picks (bf16 by default).
Nothing is re-quantized unless `requantize` asks for it, and then the logit error that re-quantizing
introduced is measured and reported."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lorakit.dtypes import DTYPES, dtype_name, parse_dtype
from lorakit.errors import LorakitError
from lorakit.io import atomic_directory
from lorakit.lora.model import LoraModel
from lorakit.merge.dense import merge_to_dense
from lorakit.models.load import load_model, load_tokenizer
from lorakit.quant.config import QuantConfig
from lorakit.quant.detect import detect_quantization
from lorakit.quant.guard import keep_4bit_trainable
from lorakit.quant.record import read_quant_record
from lorakit.quant.requantize import PROBE_PROMPTS, LogitError, logit_error, probe_inputs, prompt_logits, requantize_model


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
        stored = self.requantized.describe() if self.requantized else dtype_name(self.dtype)
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

    Raises:
        LorakitError: an unknown dtype, a missing base or an adapter that does not fit it.
    """
    target_dtype = merge_dtype(dtype)
    quant = QuantConfig.coerce(quantization) if quantization is not None else (read_quant_record(adapter_dir) or QuantConfig())
    again = QuantConfig.coerce(requantize) if requantize is not None else None
    if again is not None and not again.enabled:
        again = None
    model, quant = load_adapted_base(base, adapter_dir, quant)
    tokenizer = _tokenizer_or_none(base)
    probes = probe_inputs(tokenizer, prompts, model.config.vocab_size) if prompts else None
    reference = prompt_logits(model, probes) if probes else None

    merged = merge_to_dense(model, target_dtype)
    report = MergeReport(Path(out_dir), target_dtype, quant, again)
    with atomic_directory(out_dir) as staging:
        final = merged
        if again is not None:
            again = QuantConfig(again.quantization, again.double_quant, dtype_name(target_dtype), again.skip_modules)
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


def load_adapted_base(base: str | os.PathLike, adapter_dir: str | os.PathLike, quant: QuantConfig) -> tuple[LoraModel, QuantConfig]:
    """The adapter on its base, loaded with `quant`, and the quantization the base really has."""
    base_model = load_model(base, dtype=torch.float32, quantization=quant if quant.enabled else None)
    keep_4bit_trainable(base_model)  # evaluate through the same matmul path as training, not the CPU repack
    quant = detect_quantization(base_model)  # also covers a base directory stored quantized
    return LoraModel.from_pretrained(base_model, adapter_dir), quant


def _tokenizer_or_none(base: str | os.PathLike):
    try:
        return load_tokenizer(base)
    except (OSError, ValueError, LorakitError):
        return None


def merge_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """bf16 | fp16 | fp32 (or their long names, or the torch dtype) -> the torch dtype."""
    try:
        parsed = parse_dtype(dtype)
    except LorakitError:
        raise LorakitError(f"merge dtype {dtype!r} is unknown; use bf16, fp16 or fp32") from None
    if parsed not in DTYPES.values():
        raise LorakitError(f"merge dtype {dtype} is not supported; use bf16, fp16 or fp32")
    return parsed
