"""Quantized base weights for the CPU engine: int8 per output channel and 4 bits per block, with
C++ matmuls for decode (csrc/quant_matmul.cpp).

Decoding a token reads every weight once, so at a few rows a step is bound by memory: int8 reads
half of what bf16 does, the 4-bit format (a bf16 scale per 32 weights, as llama.cpp's Q4_0)
0.28 of it. The kernels quantize each row of x to int8 on the fly (a scale per block of K, as
llama.cpp's Q8_0 activations) and take integer dot products with AVX-512 VNNI where the CPU has
it, from 16 rows on with AMX tiles where it has those (plain loops elsewhere, the same integer
arithmetic), summing each block in int32 and the blocks in fp32. Above `DECODE_ROWS` rows (prefill)
the weight is dequantized to bf16 once and oneDNN's matmul runs instead (measured on a 2-core
Sapphire Rapids VM, gate/up 576 -> 3072: at 128 rows the kernel took 1.16 ms against 1.50 ms for
dequantize + oneDNN, before AMX; with AMX, 1.05 against 1.74 ms at 256 rows; one quiet run each).

Formats (`QuantWeight.data` is the kernels' packed layout; `dequantize` reads it back):
  int8  w[n, k] = (code - 128) * scale[n], code a byte, scale = max |w[n, :]| / 127 (fp32)
  q4_0  w[n, k] = (code - 8) * scale[n, k // block], code 4 bits, scale (bf16) = the block's
        largest-magnitude weight / -8 (llama.cpp's Q4_0: that weight is exact, the rest on 16 steps)
Columns are packed in blocks of 16 and K in groups of 4 (what one VNNI lane sums): byte
(n // 16, k // 4, n % 16, k % 4); the 4-bit codes of groups 2g and 2g+1 share a byte (low, high
nibble). N is padded to 16 and K to the block with zeros."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from lorakit.errors import LorakitError
from lorakit.kernels import native

FORMATS = ("int8", "q4_0")
BLOCKS = (32, 64)  # K per scale: the 4-bit weights' scales, and x's on-the-fly int8 scales
COLUMNS = 16  # output columns per packed block (one AVX-512 register of int32 sums)
DECODE_ROWS = 128  # up to this many rows the integer kernel runs; above, dequantize + oneDNN (measured)
_fakes_registered = False
_resolved: dict[bool, tuple[Any, _Kernels]] = {}  # portable -> (the namespace, its operators)


@dataclass(frozen=True)
class QuantWeight:
    """A (N, K) weight quantized for `matmul`: `data` (uint8, packed as the module docstring says)
    and `scales` (int8: fp32 (N padded,); q4_0: bf16 (N / 16, K / block, 16))."""

    format: str  # "int8" or "q4_0"
    shape: tuple[int, int]  # (N, K): out and in features
    block: int  # K per scale (q4_0's weights; x's on-the-fly quantization for both)
    data: torch.Tensor
    scales: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads for the weight (what bounds decode)."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


def quantize_int8(weight: torch.Tensor, block: int = 32) -> QuantWeight:
    """`weight` (N, K) as int8 with one fp32 scale per output row (symmetric: max |w| -> 127).
    `block`: the K per scale of x's int8 quantization inside the kernel."""
    w = _checked_weight(weight, block)
    scale = w.abs().amax(dim=1) / 127
    codes = torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).clamp_(-127, 127)
    codes = (_padded(codes, block) + 128).to(torch.uint8)  # (Np, Kp); padding is code 128 = 0
    rows, inputs = codes.shape
    data = codes.view(rows // COLUMNS, COLUMNS, inputs // 4, 4).permute(0, 2, 1, 3).contiguous()
    scales = torch.zeros(rows, dtype=torch.float32)
    scales[: w.shape[0]] = scale
    return QuantWeight("int8", tuple(weight.shape), block, data, scales)


def quantize_4bit(weight: torch.Tensor, block: int = 32) -> QuantWeight:
    """`weight` (N, K) as 4-bit codes with a bf16 scale per `block` weights along K (Q4_0)."""
    w = _padded(_checked_weight(weight, block), block)  # (Np, Kp)
    rows, inputs = w.shape
    blocks = w.view(rows, inputs // block, block)
    extreme = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True))  # the signed largest magnitude
    scale = (extreme / -8).bfloat16()  # rounded first, so the codes fit the scale that is stored
    divisor = torch.where(scale == 0, 1, scale.float())
    codes = torch.floor(blocks / divisor + 8.5).clamp_(0, 15).to(torch.uint8).view(rows, inputs)
    halves = codes.view(rows // COLUMNS, COLUMNS, inputs // 8, 2, 4)
    packed = halves[..., 0, :] | (halves[..., 1, :] << 4)  # (N/16, 16, K/8, 4)
    data = packed.permute(0, 2, 1, 3).contiguous()
    scales = scale.view(rows // COLUMNS, COLUMNS, inputs // block).permute(0, 2, 1).contiguous()
    return QuantWeight("q4_0", tuple(weight.shape), block, data, scales)


def dequantize(q: QuantWeight) -> torch.Tensor:
    """The weight `q` stands for, as bf16 (N, K), in plain torch: the kernels' oracle in tests."""
    return _dequantize_fp32(q).bfloat16()


def matmul(x: torch.Tensor, q: QuantWeight, bias: torch.Tensor | None = None, portable: bool = False) -> torch.Tensor:
    """x (..., K) bf16 @ W^T (+ bias) -> (..., N) bf16, W the weight `q` stands for (sums in fp32).
    Up to DECODE_ROWS rows through the integer kernel, more through a bf16 dequantization and
    oneDNN; plain torch where the kernels cannot be built. `portable`: the build without this CPU's
    vector extensions (kernels/native.py), for tests."""
    _check_input(x, q, bias)
    n, k = q.shape
    flat = x.dim() == 2  # the engine's case: no reshapes (each costs a microsecond or two, ~120 calls a step)
    rows = x if flat else x.reshape(-1, k)
    kernels = _kernels(portable)
    if kernels is not None and rows.shape[0] <= DECODE_ROWS:
        linear = kernels.linear_int8 if q.format == "int8" else kernels.linear_q4
        out = linear(rows if rows.is_contiguous() else rows.contiguous(), q.data, q.scales, n, q.block, bias)
        return out if flat else out.view(*x.shape[:-1], n)
    bias = None if bias is None else bias.to(rows.dtype)  # F.linear wants one dtype (the kernel takes any float bias)
    if kernels is None:
        out = F.linear(rows, dequantize(q), bias)
    else:
        weight = (kernels.dequantize_int8 if q.format == "int8" else kernels.dequantize_q4)(q.data, q.scales, n, k, q.block)
        out = F.linear(rows, weight, bias)
    return out if flat else out.view(*x.shape[:-1], n)


def reference(x: torch.Tensor, q: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel computes, in plain torch (fp64): x quantized to int8 per block as the kernel
    does it, times the dequantized weight, rounded to bf16 once. Its exact oracle in tests."""
    rows = x.reshape(-1, q.shape[1]).float()
    padded = F.pad(rows, (0, -rows.shape[1] % q.block)).view(rows.shape[0], -1, q.block)
    amax = padded.abs().amax(dim=2, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, 0)
    xq = torch.round(padded * inverse) * (amax / 127)  # x as the kernel's int8 codes stand for it
    xq = xq.view(rows.shape[0], -1)[:, : q.shape[1]].double()
    out = xq @ _dequantize_fp32(q).double().T
    if bias is not None:
        out += bias.double()
    return out.to(x.dtype).view(*x.shape[:-1], q.shape[0])


def _dequantize_fp32(q: QuantWeight) -> torch.Tensor:
    n, k = q.shape
    if q.format == "int8":
        blocks, groups = q.data.shape[:2]
        codes = q.data.permute(0, 2, 1, 3).reshape(blocks * COLUMNS, groups * 4)
        return ((codes.float() - 128) * q.scales[:, None])[:n, :k]
    blocks, groups = q.data.shape[:2]
    packed = q.data.permute(0, 2, 1, 3)  # (N/16, 16, K/8, 4)
    codes = torch.stack([packed & 15, packed >> 4], dim=3).reshape(blocks * COLUMNS, groups * 8)
    scales = q.scales.permute(0, 2, 1).reshape(blocks * COLUMNS, -1).float()
    return ((codes.float() - 8) * scales.repeat_interleave(q.block, dim=1))[:n, :k]


def _checked_weight(weight: torch.Tensor, block: int) -> torch.Tensor:
    """The weight as fp32, refused in one line where it is not a finite 2-d float matrix."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        got = f"{weight.dim()}-d {weight.dtype}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise LorakitError(f"quantize: the weight must be a 2-d float tensor (out, in), got {got}")
    if weight.device.type != "cpu":
        raise LorakitError(f"quantize: the weight is on {weight.device}; the quantized kernels run on the CPU (move it with .cpu())")
    if block not in BLOCKS:
        raise LorakitError(f"quantize: block must be one of {BLOCKS}, got {block}")
    if 0 in weight.shape:
        raise LorakitError(f"quantize: the weight {tuple(weight.shape)} is empty")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise LorakitError("quantize: the weight has NaN or inf values; quantizing them would give garbage (check the checkpoint)")
    return w


def _padded(w: torch.Tensor, block: int) -> torch.Tensor:
    """w with zero rows up to a multiple of COLUMNS and zero columns up to a multiple of `block`."""
    return F.pad(w, (0, -w.shape[1] % block, 0, -w.shape[0] % COLUMNS))


def _check_input(x: torch.Tensor, q: QuantWeight, bias: torch.Tensor | None) -> None:
    n, k = q.shape
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        got = f"{x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise LorakitError(f"quant matmul: x must be a bf16 CPU tensor, got {got} (cast it with .bfloat16())")
    if x.dim() == 0 or x.shape[-1] != k:
        raise LorakitError(f"quant matmul: x {tuple(x.shape)} must end in the weight's {k} input features")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise LorakitError(f"quant matmul: bias must be a float tensor of the weight's {n} output features, got {tuple(bias.shape)}")


def load(portable: bool = False) -> Any | None:
    """The namespace of the kernels (torch.ops.lorakit_kernels): quant_linear_int8 / quant_linear_q4
    (x, data, scales, n, block, bias=None) -> (B, N) and quant_dequantize_int8 / quant_dequantize_q4
    (data, scales, n, k, block) -> (N, K) bf16; None where they cannot be built. `portable`: the
    build without this CPU's vector extensions (kernels/native.py), for tests."""
    global _fakes_registered
    ops = native.ops(portable)
    if ops is not None and not portable and not _fakes_registered:  # output shapes, for torch.compile's tracing
        for name in ("quant_linear_int8", "quant_linear_q4"):
            torch.library.register_fake(f"{native.NAMESPACE}::{name}", _linear_shape)
        _fakes_registered = True
    return ops


def isa(portable: bool = False) -> str | None:
    """The path the kernels take on this CPU: "amx" (AVX-512 VNNI below 16 rows), "avx512_vnni", or
    "plain" (the portable loops: correct, but in the portable build on q/k/v at 16 rows ~10x slower
    than bf16 through oneDNN, about even at one row: quantize there for memory, not speed); None
    where they cannot be built."""
    ops = load(portable)
    return None if ops is None else ops.quant_isa()


class _Kernels(NamedTuple):
    linear_int8: Callable[..., torch.Tensor]
    linear_q4: Callable[..., torch.Tensor]
    dequantize_int8: Callable[..., torch.Tensor]
    dequantize_q4: Callable[..., torch.Tensor]


def _kernels(portable: bool) -> _Kernels | None:
    """The four operators, resolved once per `load` result: a decode step makes ~120 of these calls,
    and looking an operator up through torch.ops costs microseconds each time."""
    ops = load(portable)
    if ops is None:
        return None
    cached = _resolved.get(portable)
    if cached is None or cached[0] is not ops:
        kernels = _Kernels(ops.quant_linear_int8.default, ops.quant_linear_q4.default,
                           ops.quant_dequantize_int8.default, ops.quant_dequantize_q4.default)
        _resolved[portable] = cached = (ops, kernels)
    return cached[1]


def _linear_shape(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, n: int, block: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)
