"""bitsandbytes' Linear4bit drops its input gradient after an eval pass on the CPU; lorakit must not."""

from __future__ import annotations

import warnings

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.models.load import load_model
from lorakit.quant.guard import ensure_4bit_trainable, find_repacked_4bit, is_repacked, keep_4bit_trainable
from lorakit.weights.dequant import dense_weight
from tests.quant.qhelpers import save_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_nf4"))


def eval_pass(module: torch.nn.Module, x: torch.Tensor) -> None:
    module.eval()
    with torch.no_grad():
        module(x)
    module.train()


def input_grad(layer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor | None:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    if not out.requires_grad:
        return None
    out.backward(upstream)
    return x.grad


def test_upstream_bug_is_still_there_and_detected(model_dir):
    """Documents bitsandbytes 0.50's behaviour; if this fails, bitsandbytes changed and guard.py may go."""
    layer = load_model(model_dir, quantization="nf4").model.layers[0].self_attn.q_proj
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX-512 BF16: bitsandbytes never repacks here")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    eval_pass(layer, x)
    assert is_repacked(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert input_grad(layer, x, torch.ones(3, 64, dtype=torch.bfloat16)) is None


def test_guarded_layer_keeps_its_input_gradient_after_eval(model_dir):
    model = load_model(model_dir, quantization="nf4")
    keep_4bit_trainable(model)
    layer = model.model.layers[0].mlp.down_proj  # 128 -> 64
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    upstream = torch.randn(5, 64, dtype=torch.bfloat16)
    before = input_grad(layer, x, upstream)
    eval_pass(layer, x)
    after = input_grad(layer, x, upstream)
    assert not is_repacked(layer)
    expected = upstream.float() @ dense_weight(layer)
    assert after is not None and torch.equal(before, after)
    torch.testing.assert_close(after.float(), expected, atol=0.05, rtol=0.02)


def test_repacked_layers_are_found_unpacked_and_dequantize_the_same(model_dir):
    model = load_model(model_dir, quantization="nf4")
    layer = model.model.layers[1].self_attn.o_proj
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX-512 BF16: bitsandbytes never repacks here")
    exact = dense_weight(layer).clone()
    eval_pass(model, torch.randint(0, 128, (1, 8)))
    assert len(find_repacked_4bit(model)) == 14  # 7 linear layers x 2 decoder layers
    # dense_weight reads the repacked layout directly (scales only rounded to bf16 by bitsandbytes)
    torch.testing.assert_close(dense_weight(layer), exact, rtol=2**-8, atol=1e-6)
    with pytest.raises(LorakitError, match="lost their gradient path"):
        ensure_4bit_trainable(model)
    with pytest.warns(UserWarning, match="repacked by bitsandbytes"):
        restored = keep_4bit_trainable(model)
    assert len(restored) == 14 and find_repacked_4bit(model) == []
    torch.testing.assert_close(dense_weight(layer), exact, rtol=2**-7, atol=1e-6)
    ensure_4bit_trainable(model)  # now passes
