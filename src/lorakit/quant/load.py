"""Load a base model quantized through transformers' `BitsAndBytesConfig`, and recognise one.

The weights are read once, shard by shard, and quantized as they arrive, so the full-precision model is
never held in memory. The result is an ordinary transformers model whose linear layers are
bitsandbytes' `Linear4bit` / `Linear8bitLt`: peft, transformers' `save_pretrained` and lorakit's
`LoraLinear` all know them."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lorakit.quant.config import QuantConfig

LINEAR_4BIT = "Linear4bit"
LINEAR_8BIT = "Linear8bitLt"


def bnb_config(config: QuantConfig):
    """transformers' `BitsAndBytesConfig` for `config` (which must be enabled)."""
    from transformers import BitsAndBytesConfig

    skip = list(config.skip_modules) if config.skip_modules else None
    if config.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quantization,
        bnb_4bit_use_double_quant=config.uses_double_quant,
        bnb_4bit_compute_dtype=config.torch_compute_dtype,
        llm_int8_skip_modules=skip,
    )


def load_quantized(path: str | os.PathLike, config: QuantConfig, device: str | torch.device = "cpu", **kwargs: Any) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path, quantization_config=...)`; the layers left unquantized
    (embeddings, norms, output head) are held in `config.compute_dtype`."""
    from transformers import AutoModelForCausalLM

    config.validate(device)
    kwargs.setdefault("dtype", config.torch_compute_dtype)
    kwargs.setdefault("local_files_only", True)
    device_map = {"": str(torch.device(device))}
    with quiet_bitsandbytes():
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=bnb_config(config), device_map=device_map, **kwargs)
    own_unquantized_tensors(model)
    release_freed_memory()
    return model


def own_unquantized_tensors(model: nn.Module) -> int:
    """Copy the layers left unquantized out of the checkpoint's memory map; returns how many.

    When the checkpoint already holds the compute dtype, transformers hands those tensors out as views
    of the mmapped safetensors file; they keep the whole mapping alive, and every page quantization
    read stays resident: 2.1 GB of a 2.2 GB file for a 1.1B model whose quantized weights take 0.5 GB.
    Only tensors inside such a mapping are copied (copying the others would just raise the peak)."""
    mapped = _safetensors_mappings()
    if not mapped:
        return 0
    copied = 0
    with torch.no_grad():
        for param in model.parameters():
            if type(param).__name__ not in ("Params4bit", "Int8Params") and _inside(param, mapped):
                param.data = param.data.clone()
                copied += 1
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and _inside(buffer, mapped):
                    module._buffers[name] = buffer.clone()
                    copied += 1
    return copied


def _safetensors_mappings() -> list[tuple[int, int]]:
    """Address ranges of memory-mapped .safetensors files in this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = [line.split() for line in maps if ".safetensors" in line]
    except OSError:
        return []
    return [tuple(int(a, 16) for a in fields[0].split("-")) for fields in lines]


def _inside(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    address = tensor.untyped_storage().data_ptr()
    return any(start <= address < end for start, end in ranges)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc only). Quantizing on load frees every
    full-precision tensor it read, in small pieces the allocator keeps: ~0.45 GB of resident memory
    for the 135M default model, more for larger ones."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
            pass


def is_quantized_layer(module: nn.Module) -> bool:
    return type(module).__name__ in (LINEAR_4BIT, LINEAR_8BIT) or _is_bnb_subclass(module)


def _is_bnb_subclass(module: nn.Module) -> bool:
    return any(cls.__name__ in (LINEAR_4BIT, LINEAR_8BIT) and cls.__module__.startswith("bitsandbytes") for cls in type(module).__mro__)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every bitsandbytes 4-bit / 8-bit linear layer, by module path."""
    return {name: m for name, m in model.named_modules() if is_quantized_layer(m)}


def detect_quantization(model: nn.Module) -> QuantConfig:
    """The QuantConfig a loaded model was quantized with (quantization "none" for a plain model)."""
    for module in model.modules():
        if not is_quantized_layer(module):
            continue
        weight = module.weight
        if type(weight).__name__ == "Params4bit":
            state = weight.quant_state
            compute = getattr(module, "compute_dtype", None) or torch.bfloat16
            name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}.get(compute, "bfloat16")
            nested = bool(getattr(state, "nested", False) or getattr(state, "original_nested", False)) if state is not None else weight.compress_statistics
            return QuantConfig(quantization=weight.quant_type, double_quant=nested, compute_dtype=name)
        return QuantConfig(quantization="int8")
    return QuantConfig()


def import_bitsandbytes():
    """`import bitsandbytes`, without its warning about an optional hub kernel (see quiet_bitsandbytes)."""
    with quiet_bitsandbytes():
        import bitsandbytes
    return bitsandbytes


class quiet_bitsandbytes:
    """Silence bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" line: that
    optional kernel wants a hub download, and the built-in path it falls back to is the one lorakit uses."""

    def __enter__(self) -> None:
        import logging

        self._logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._logger.setLevel(self._level)
