"""LoraLinear on its own: the update's formula, scaling, merging, Conv1D's layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.layer import LoraLinear, adapters_disabled



ATOL = 1e-5


def make_layer(seed: int = 0, in_features: int = 12, out_features: int = 10, bias: bool = True, **adapter) -> LoraLinear:
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(in_features, out_features, bias=bias))
    layer.add_adapter("default", **{"r": 4, "lora_alpha": 8, **adapter})
    return layer


def randomize_b(layer: LoraLinear, name: str = "default", seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=generator))


def inputs(in_features: int = 12) -> torch.Tensor:
    return torch.randn(3, 5, in_features, generator=torch.Generator().manual_seed(2))


def test_fresh_adapter_changes_nothing() -> None:
    layer = make_layer()
    x = inputs()
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0


def test_update_is_scaling_times_b_a_x() -> None:
    layer = make_layer()
    randomize_b(layer)
    x = inputs()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (x @ a.T @ b.T) * (8 / 4)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("use_rslora", "scaling"), [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_rslora_scaling(use_rslora: bool, scaling: float) -> None:
    layer = make_layer(lora_alpha=16, use_rslora=use_rslora)
    assert layer.scaling["default"] == pytest.approx(scaling)
    randomize_b(layer)
    x = inputs()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x) - layer.base_layer(x), (x @ a.T @ b.T) * scaling, atol=ATOL, rtol=0)


def test_dropout_acts_on_the_lora_path_only() -> None:
    layer = make_layer(lora_dropout=0.5)
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    assert isinstance(make_layer().lora_dropout["default"], nn.Identity)
    randomize_b(layer)
    x = inputs()
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    layer.train()
    torch.manual_seed(3)
    dropped = layer(x) - layer.base_layer(x)
    torch.manual_seed(3)
    mask = nn.functional.dropout(torch.ones_like(x), p=0.5, training=True)  # the same draw the layer made
    # The base path sees x whole; the LoRA path sees the dropped-out x (scaled by 1 / (1 - p)).
    torch.testing.assert_close(dropped, ((x * mask) @ a.T @ b.T) * s, atol=ATOL, rtol=0)
    assert not torch.allclose(dropped, (x @ a.T @ b.T) * s, atol=ATOL)
    layer.eval()  # no dropout in evaluation
    torch.testing.assert_close(layer(x) - layer.base_layer(x), (x @ a.T @ b.T) * s, atol=ATOL, rtol=0)


def test_merge_unmerge_keep_the_output_and_restore_the_weight() -> None:
    layer = make_layer()
    randomize_b(layer)
    x = inputs()
    before, weight = layer(x), layer.base_layer.weight.clone()
    layer.merge()
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer(x), before, atol=ATOL, rtol=0)
    assert not torch.allclose(layer.base_layer.weight, weight)
    layer.unmerge()
    assert layer.merged_adapters == []
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=ATOL, rtol=0)


def test_merge_twice_equals_merge_once() -> None:
    layer = make_layer()
    randomize_b(layer)
    layer.merge()
    once = layer.base_layer.weight.clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, once)
    assert layer.merged_adapters == ["default"]


def test_safe_merge_refuses_nan_and_leaves_the_weight() -> None:
    layer = make_layer()
    weight = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(LorakitError, match="NaN or inf"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, weight) and layer.merged_adapters == []


def test_disabled_layer_runs_the_base_even_when_merged() -> None:
    layer = make_layer()
    randomize_b(layer)
    layer.merge()
    x = inputs()
    merged_out = layer(x)
    with adapters_disabled(layer):
        assert layer.merged_adapters == []  # entering the block unmerged it
        base_out = layer(x)
        torch.testing.assert_close(base_out, layer.base_layer(x), atol=0, rtol=0)
    assert layer.merged_adapters == ["default"]  # leaving it merged it back
    torch.testing.assert_close(layer(x), merged_out, atol=ATOL, rtol=0)
    assert not torch.allclose(layer(x), base_out)


def test_two_active_adapters_add_up() -> None:
    layer = make_layer()
    layer.add_adapter("other", r=2, lora_alpha=2)
    randomize_b(layer, "default", seed=1)
    randomize_b(layer, "other", seed=2)
    x = inputs()
    layer.set_active(["default"])
    only_default = layer(x) - layer.base_layer(x)
    layer.set_active(["other"])
    only_other = layer(x) - layer.base_layer(x)
    layer.set_active(["default", "other"])
    torch.testing.assert_close(layer(x) - layer.base_layer(x), only_default + only_other, atol=ATOL, rtol=0)


def test_conv1d_delta_is_stored_transposed() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(10, 12)  # nf=out=10, nx=in=12, weight (12, 10)
    layer = LoraLinear(conv)
    layer.add_adapter("default", r=4, lora_alpha=8)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (12, 10, True)
    randomize_b(layer)
    assert layer.delta_weight("default").shape == (12, 10)
    x = inputs()
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=ATOL, rtol=0)


def test_fan_in_fan_out_flag_cannot_transpose_a_linear() -> None:
    """A wrong flag must not corrupt the merge of a square nn.Linear (peft overrides it too)."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8), fan_in_fan_out=True)
    layer.add_adapter("default", r=2, lora_alpha=4)
    randomize_b(layer)
    assert layer.fan_in_fan_out is False
    x = inputs(8)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=ATOL, rtol=0)


def test_only_linear_and_conv1d_can_be_wrapped() -> None:
    with pytest.raises(LorakitError, match="cannot put LoRA on a Embedding"):
        LoraLinear(nn.Embedding(4, 4))


def test_delete_a_merged_adapter_unmerges_it_first() -> None:
    layer = make_layer()
    weight = layer.base_layer.weight.clone()
    randomize_b(layer)
    layer.merge()
    layer.delete_adapter("default")
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)
    assert list(layer.lora_A) == [] and layer.active_adapters == []


def test_autocast_path_matches_plain_path_and_trains_both_factors():
    """Under bf16 autocast the update is fused into one addmm; it must agree with the fp32 path."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 24))
    layer.add_adapter("default", r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(3, 5, 32)
    plain = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x)
    assert fused.dtype == torch.bfloat16 and fused.shape == plain.shape
    torch.testing.assert_close(fused.float(), plain, rtol=2e-2, atol=2e-2)
    fused.float().sum().backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
