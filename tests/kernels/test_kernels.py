"""The lean kernels against their plain-PyTorch twins: same outputs, same input gradients."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from lorakit import LoraConfig, get_peft_model
from lorakit.kernels.causal_attention import causal_attention
from lorakit.kernels.dropout import keep_mask
from lorakit.kernels.rms_norm import reference_rms_norm, rms_norm
from lorakit.kernels.swiglu import swiglu
from lorakit.train.fused import lean_blocks
from tests.helpers import make_tiny_llama, randomize_lora_b


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def test_rms_norm_matches_llama_rms_norm_in_fp32():
    torch.manual_seed(0)
    x, weight = torch.randn(3, 7, 16), torch.rand(16) + 0.5
    norm = LlamaRMSNorm(16, eps=1e-6)
    norm.weight.data.copy_(weight)
    out, (grad,) = _grads(lambda t: rms_norm(t, weight, 1e-6), x)
    ref, (ref_grad,) = _grads(norm, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, reference_rms_norm(x, weight, 1e-6))


def test_swiglu_matches_silu_times_up():
    torch.manual_seed(0)
    gate, up = torch.randn(4, 9), torch.randn(4, 9)
    out, grads = _grads(swiglu, gate, up)
    ref, ref_grads = _grads(lambda a, b: F.silu(a) * b, gate, up)
    torch.testing.assert_close(out, ref)
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_lean_blocks_swap_every_norm_and_mlp_and_keep_the_model_exact():
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    randomize_lora_b(model)
    ids = torch.randint(0, 128, (2, 12))
    expected = model(input_ids=ids).logits
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    norms = sum(isinstance(m, LlamaRMSNorm) for m in model.modules())
    mlps = sum(isinstance(m, LlamaMLP) for m in model.modules())
    with lean_blocks(model) as swapped:
        assert swapped == norms + mlps
        got = model(input_ids=ids).logits
        got.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())  # swapped back


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_causal_attention_matches_sdpa(dtype, tol, heads, kv_heads):
    torch.manual_seed(0)
    q, k, v = torch.randn(heads, 11, 8, dtype=dtype), torch.randn(kv_heads, 11, 8, dtype=dtype), torch.randn(kv_heads, 11, 8, dtype=dtype)
    out, grads = _grads(lambda a, b, c: causal_attention(a, b, c, 0.3), q, k, v)
    ref, ref_grads = _grads(
        lambda a, b, c: F.scaled_dot_product_attention(a[None], b[None], c[None], is_causal=True, scale=0.3, enable_gqa=True)[0], q, k, v
    )
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=tol, atol=tol)


def test_lean_blocks_swap_dropout_to_the_hash_kernel_in_training_only():
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8))
    x = torch.randn(64, 8)
    with lean_blocks(model) as swapped:
        assert swapped == 1
        torch.manual_seed(0)
        seed = int(torch.randint(-(2**31), 2**31 - 1, ()))  # what the kernel draws first
        hidden = model[0](x)
        expected = hidden * keep_mask(hidden.shape, 0.5, seed) * 2
        torch.manual_seed(0)
        torch.testing.assert_close(model[1](hidden), expected)
        model.eval()
        torch.testing.assert_close(model[1](hidden), hidden)  # eval mode: no dropout at all
    assert "forward" not in model[1].__dict__


def test_dropout_sdpa_is_sdpa_outside_training_and_masks_padding_inside():
    from torch import nn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lorakit.train.attention import dropout_sdpa

    module = nn.Module()
    module.is_causal = False
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, :, :, 4:] = False  # the second row's last two tokens are padding
    expected = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0)[0]
    torch.manual_seed(0)
    outside = dropout_sdpa(module, q, k, v, mask, dropout=0.5)[0]  # not a training thread: SDPA itself,
    torch.manual_seed(0)
    assert torch.equal(outside, sdpa_attention_forward(module, q, k, v, mask, dropout=0.5)[0])  # its own draws
    with lean_blocks(module):
        out = dropout_sdpa(module, q, k, v, mask, dropout=1e-9)[0]  # the math path, nothing dropped
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        v_pad = v.clone()
        v_pad[1, :, 4:] = 1e6  # padding keys must carry no weight
        torch.testing.assert_close(dropout_sdpa(module, q, k, v_pad, mask, dropout=1e-9)[0], expected, rtol=1e-5, atol=1e-5)
        dropped = dropout_sdpa(module, q, k, v, mask, dropout=0.5)[0]
        assert not torch.allclose(dropped, expected)
