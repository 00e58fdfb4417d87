"""Tensors still inside a checkpoint's memory map, and copying them out of it.

When the checkpoint already holds the compute dtype, transformers hands the layers it leaves
unquantized out as views of the mmapped safetensors file; they keep the whole mapping alive, and every
page quantization read stays resident: 2.1 GB of a 2.2 GB file for a 1.1B model whose quantized
weights take 0.5 GB."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.weights.kinds import is_quantized

AddressRange = tuple[int, int]


def own_unquantized_tensors(model: nn.Module) -> int:
    """Copy the tensors that live inside a mapped .safetensors file; returns how many.

    Only tensors inside such a mapping are copied (copying the others would just raise the peak);
    quantized weights were built in fresh memory and are never inside one."""
    mapped = safetensors_mappings()
    if not mapped:
        return 0
    copied = 0
    with torch.no_grad():
        for param in model.parameters():
            if not is_quantized(param) and inside(param, mapped):
                param.data = param.data.clone()
                copied += 1
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and inside(buffer, mapped):
                    module._buffers[name] = buffer.clone()
                    copied += 1
    return copied


def safetensors_mappings() -> list[AddressRange]:
    """Address ranges of memory-mapped .safetensors files in this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = [line.split() for line in maps if ".safetensors" in line]
    except OSError:
        return []
    return [tuple(int(a, 16) for a in fields[0].split("-")) for fields in lines]


def inside(tensor: torch.Tensor, ranges: list[AddressRange]) -> bool:
    """True if the tensor's storage starts inside one of `ranges` (CPU tensors only)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    address = tensor.untyped_storage().data_ptr()
    return any(start <= address < end for start, end in ranges)
