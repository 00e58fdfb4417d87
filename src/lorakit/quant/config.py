"""`QuantConfig`: how the frozen base is quantized on load, and its validation.

lorakit does not quantize by itself: the base goes through transformers' `BitsAndBytesConfig` and
bitsandbytes, so a quantized model, its checkpoints and adapters trained on it stay what peft and
transformers expect (bitsandbytes' `Params4bit` + `QuantState` layout)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.config import setting
from lorakit.dtypes import DTYPES, parse_dtype
from lorakit.errors import ConfigError
from lorakit.quant.bnb import import_bitsandbytes

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
SUPPORTED_DEVICES = ("cpu", "cuda", "xpu")


@dataclass
class QuantConfig:
    """The base model's storage: 4-bit (NF4 / FP4), 8-bit (LLM.int8) or none. Adapters are never quantized."""

    quantization: str = setting("none", "nf4 | fp4 | int8 | none: store the frozen base quantized (QLoRA); nf4 is QLoRA's "
                                "format, int8 bitsandbytes' LLM.int8 (row-wise absmax)")
    double_quant: bool | None = setting(None, "quantize the 4-bit block scales again (8-bit, blocks of 256; ~0.37 bits per "
                                        "weight saved); unset means on for nf4 / fp4, which alone have it")
    compute_dtype: str = setting("bfloat16", "dtype the 4-bit weights are dequantized to for each matmul, and of the layers "
                                 "left unquantized (embeddings, norms, output head)")
    skip_modules: list[str] | None = setting(None, "module names kept unquantized besides the output head (which transformers skips by itself)")

    def __post_init__(self) -> None:
        if isinstance(self.quantization, str):
            self.quantization = self.quantization.lower()
        if self.quantization is None:
            self.quantization = "none"
        self.validate()

    # --- what it means ------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.quantization != "none"

    @property
    def is_4bit(self) -> bool:
        return self.quantization in ("nf4", "fp4")

    @property
    def uses_double_quant(self) -> bool:
        return self.is_4bit and self.double_quant is not False

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return parse_dtype(self.compute_dtype)

    def describe(self) -> str:
        if not self.enabled:
            return "not quantized"
        extra = " + double quant" if self.uses_double_quant else ""
        return f"{self.quantization}{extra}, compute in {self.torch_compute_dtype}".replace("torch.", "")

    # --- validation ---------------------------------------------------------------------------
    def problems(self, device: str | torch.device | None = None) -> list[str]:
        """Every problem with the values (and, given a device, with the platform), reported together."""
        found = []
        if self.quantization not in QUANTIZATIONS:
            found.append(f"quantization must be one of {' | '.join(QUANTIZATIONS)} (got {self.quantization!r})")
        if self.compute_dtype not in DTYPES:
            found.append(f"compute_dtype must be one of bfloat16, float16, float32 (got {self.compute_dtype!r})")
        if self.double_quant not in (None, True, False):
            found.append(f"double_quant must be true or false (got {self.double_quant!r})")
        elif self.double_quant and self.quantization in ("int8", "none"):
            found.append(f"double_quant applies to nf4 / fp4 only; drop it or use quantization: nf4 (got quantization: {self.quantization})")
        if self.skip_modules is not None and not (isinstance(self.skip_modules, list) and all(isinstance(m, str) for m in self.skip_modules)):
            found.append(f"skip_modules must be a list of module names (got {self.skip_modules!r})")
        if self.enabled and not found:
            found += platform_problems(self, device)
        return found

    def validate(self, device: str | torch.device | None = None) -> None:
        found = self.problems(device)
        if found:
            raise ConfigError(found, "quantization config")

    # --- conversions --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> QuantConfig:
        """From a YAML/JSON mapping; unknown keys are reported rather than ignored."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError([f"unknown key {k!r} (known: {', '.join(sorted(names))})" for k in unknown], "quantization config")
        return cls(**data)

    @classmethod
    def coerce(cls, value: QuantConfig | str | dict[str, Any] | None) -> QuantConfig:
        """Accept a QuantConfig, a format name ("nf4"), a mapping, or None (no quantization)."""
        if isinstance(value, QuantConfig):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(quantization=value)
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise ConfigError([f"quantization must be a name (nf4 | fp4 | int8 | none) or a QuantConfig (got {type(value).__name__})"], "quantization config")


def platform_problems(config: QuantConfig, device: str | torch.device | None = None) -> list[str]:
    """Why `config` cannot run here, if it cannot: bitsandbytes missing or a device it has no kernels for."""
    try:
        import_bitsandbytes()
    except Exception as err:  # ImportError, or a broken native library
        return [f"quantization: {config.quantization} needs bitsandbytes, which failed to import ({err}); run `pip install 'bitsandbytes>=0.50'`"]
    kind = torch.device(device).type if device is not None else "cpu"
    if kind not in SUPPORTED_DEVICES:
        return [f"quantization: {config.quantization} is not available on {kind}; bitsandbytes runs on {', '.join(SUPPORTED_DEVICES)}"]
    if kind == "cuda" and not torch.cuda.is_available():
        return ["device cuda was asked for but CUDA is not available; use device cpu"]
    return []
