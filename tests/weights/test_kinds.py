"""Weight kinds: dense tensors, bitsandbytes' Params4bit and Int8Params, told apart without importing bitsandbytes."""

from __future__ import annotations

import warnings

import pytest
import torch

from lorakit.weights.kinds import WeightKind, is_4bit, is_quantized, weight_kind

warnings.filterwarnings("ignore", message=".*kernels.*")


def packed_4bit() -> torch.Tensor:
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.nn.Params4bit(torch.randn(16, 64), requires_grad=False, quant_type="nf4")._quantize("cpu")


def packed_int8() -> torch.Tensor:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(64, 16, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(torch.randn(16, 64), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu").weight


def test_dense_weights_and_none_are_dense() -> None:
    for param in (torch.randn(4, 4), torch.nn.Parameter(torch.randn(4, 4)), None):
        assert weight_kind(param) is WeightKind.DENSE
        assert not is_quantized(param) and not is_4bit(param)


def test_4bit_weights() -> None:
    param = packed_4bit()
    assert weight_kind(param) is WeightKind.NF4 and is_quantized(param) and is_4bit(param)


def test_8bit_weights() -> None:
    param = packed_int8()
    assert weight_kind(param) is WeightKind.INT8 and is_quantized(param) and not is_4bit(param)
