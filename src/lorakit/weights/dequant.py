"""A layer's weight as dense values: bitsandbytes' packed weights dequantized exactly, others as stored.

Every quantized format is dequantized straight to fp32 (the 4-bit code times its fp32 block scale is
exact in fp32), so a merge adds the adapter to exactly the weights the adapter was trained against."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.weights.kinds import WeightKind, weight_kind


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The module's weight as a plain float tensor in its stored layout; bitsandbytes 4-bit / 8-bit
    weights are dequantized (to fp32 unless `dtype` says otherwise), anything else is returned as stored."""
    weight = module.weight
    kind = weight_kind(weight)
    if kind is WeightKind.NF4:
        return dequantize_params4bit(weight, dtype or torch.float32)
    if kind is WeightKind.INT8:
        return dequantize_int8(module, dtype or torch.float32)
    return weight if dtype is None else weight.to(dtype)


def block_scales(state) -> torch.Tensor:
    """The fp32 absmax of every 64-weight block, undoing double quantization if it was used."""
    import bitsandbytes.functional as bnbf  # here: bitsandbytes costs ~1 s to import; only quantized weights need it

    if state.nested:
        return bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax.float()


def dequantize_params4bit(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A bitsandbytes `Params4bit` as a dense (out, in) tensor."""
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return _dequantize_cpu_layout(weight.data, state).to(dtype)
    packed = weight.data if weight.data.dtype == torch.uint8 else weight.data.view(torch.uint8)
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, block_scales(state), state.blocksize, state.quant_type, state.shape, dtype)


def _dequantize_cpu_layout(packed: torch.Tensor, state) -> torch.Tensor:
    """Dequantize a weight bitsandbytes repacked for its CPU inference kernel (see quant/guard.py): codes in
    tiles of 32 rows, block scales already in bf16 and transposed to (in / blocksize, out)."""
    from bitsandbytes.backends.utils import _get_4bit_code  # here: see block_scales

    out_features, half = packed.shape
    tile = 32
    codes = torch.cat([packed.reshape(-1, tile) & 0xF, (packed.reshape(-1, tile) >> 4) & 0xF], dim=-1)  # low 32, high 32
    codes = codes.reshape(out_features // tile, half, tile, 2).transpose(1, 2).reshape(out_features, 2 * half)
    values = _get_4bit_code(state.quant_type, packed.device).float()[codes.long()]  # (out, in)
    scales = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)  # (out, in)
    return values * scales


def dequantize_int8(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LLM.int8 weights: int8 codes times each row's absmax / 127."""
    weight = module.weight
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise ValueError(f"{type(module).__name__} has no SCB row scales; it was never quantized (move it to a device first)")
    return (weight.data.float() * (scb.float().unsqueeze(1) / 127.0)).to(dtype)
