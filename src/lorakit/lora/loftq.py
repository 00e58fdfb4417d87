"""LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659): start the adapter from what quantization loses.

Alternate `iterations` times: Q = quantize(W - B A), then B A = the rank-r SVD of W - dequantize(Q). The
layer keeps dequantize(Q) as its weight, which quantizes back to Q exactly (its block maxima are
representable), so loading that base in NF4 and adding the adapter gives about W, not W's quantization.
The arithmetic is peft 0.21's `loftq_init` (NF4 blocks of 64 without double quantization, or LLM.int8
rows) on bitsandbytes' own quantizers; it runs on any device bitsandbytes runs on, peft's needs a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.weights.kinds import is_quantized


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, rank: int, bits: int = 4, iterations: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized Q, A, B) for `weight` (out, in) in fp32: A (rank, in), B (out, rank), B A ~ W - Q.

    As in peft, B A is not divided by the adapter's scaling: with lora_alpha != r the start is off by
    that factor in both tools (peft's LoftQ recipe uses lora_alpha = r)."""
    import bitsandbytes.functional as functional  # here: ~1 s to import, and only LoftQ needs it

    residual = weight.clone()
    for step in range(iterations):
        if bits == 4:
            codes, state = functional.quantize_4bit(residual, blocksize=64, compress_statistics=False, quant_type="nf4")
            dequantized = functional.dequantize_4bit(codes, state).float()
        else:
            codes, row_scales, _ = functional.int8_vectorwise_quant(residual)
            dequantized = functional.int8_vectorwise_dequant(codes, row_scales).float()
        lora_b, lora_a = low_rank(weight - dequantized, rank)
        if step + 1 == iterations:
            break
        residual = weight - lora_b @ lora_a
    return dequantized, lora_a, lora_b


def original_weights(model: nn.Module, paths: list[str]) -> dict[str, torch.Tensor]:
    """For LoftQ on a quantized base: each targeted layer's unquantized weight, read from the checkpoint
    the model was loaded from (model.safetensors, or the shards its index names), by module path.
    Empty when no target is quantized.

    Raises:
        LorakitError: only some targets are quantized, or the checkpoint or a weight in it is missing.
    """
    quantized = [p for p in paths if is_quantized(_base(model.get_submodule(p)).weight)]
    if not quantized:
        return {}
    if len(quantized) != len(paths):
        dense = next(p for p in paths if p not in quantized)
        raise LorakitError(f"init_lora_weights 'loftq' found {dense} unquantized among quantized targets; target only quantized layers, or load the base unquantized")
    directory = Path(getattr(model, "name_or_path", "") or ".")
    files = _checkpoint_files(directory)
    from safetensors import safe_open

    weights, opened = {}, {}
    for path in paths:
        key = f"{path}.weight"
        if key not in files:
            raise LorakitError(f"{key} is not in the checkpoint in {directory}; LoftQ on a quantized base reads the original weights from there")
        handle = opened.setdefault(files[key], safe_open(str(files[key]), framework="pt"))
        weights[path] = handle.get_tensor(key).float()
    return weights


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _checkpoint_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise LorakitError(f"no model.safetensors in {directory}; LoftQ on a quantized base reads the original weights "
                           "from the checkpoint the base was loaded from (load it from a local directory)")
    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R the best rank-`rank` approximation of `matrix`: U sqrt(S) and sqrt(S) V^T."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(s[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]
