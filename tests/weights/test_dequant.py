"""dense_weight: dense layers as stored, bitsandbytes' packed weights dequantized exactly (bitsandbytes'
own dequantization as the oracle)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lorakit.weights.dequant import dense_weight, dequantize_int8

warnings.filterwarnings("ignore", message=".*kernels.*")


def test_a_dense_weight_is_returned_as_stored_or_cast() -> None:
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    assert dense_weight(layer) is layer.weight
    cast = dense_weight(layer, torch.float32)
    assert cast.dtype == torch.float32 and torch.equal(cast, layer.weight.float())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_matches_bitsandbytes(quant_type) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type=quant_type, compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type=quant_type, compress_statistics=True)
    layer = layer.to("cpu")
    expected = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    got = dense_weight(layer)
    assert got.dtype == torch.float32 and got.shape == (32, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert dense_weight(layer, torch.bfloat16).dtype == torch.bfloat16


def test_int8_is_codes_times_row_scale() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(64, 16, bias=False, has_fp16_weights=False)
    weight = torch.randn(16, 64)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    got = dense_weight(layer)
    torch.testing.assert_close(got, layer.weight.data.float() * layer.weight.SCB.float().unsqueeze(1) / 127)
    assert (got - weight).abs().max() <= weight.abs().max(dim=1).values.max() / 127


def test_int8_without_row_scales_says_so() -> None:
    class NeverQuantized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2, 2, dtype=torch.int8), requires_grad=False)

    with pytest.raises(ValueError, match="no SCB row scales"):
        dequantize_int8(NeverQuantized())
