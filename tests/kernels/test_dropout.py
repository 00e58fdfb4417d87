"""The hash-mask dropout: drop rate, independence, scaling, gradient and repeatability."""

from __future__ import annotations

import torch

from lorakit.kernels.dropout import dropout, keep_mask


def test_keep_rate_and_independence() -> None:
    n = 400_000
    mask = keep_mask((n,), 0.1, seed=12345).float()
    assert abs(mask.mean().item() - 0.9) < 0.003  # 5 standard deviations at n = 400k
    for lag in (1, 2, 64, 384):  # neighbours and row strides of typical activations
        corr = torch.corrcoef(torch.stack([mask[:-lag], mask[lag:]]))[0, 1].item()
        assert abs(corr) < 0.01, (lag, corr)
    other = keep_mask((n,), 0.1, seed=12346).float()
    assert abs(torch.corrcoef(torch.stack([mask, other]))[0, 1].item()) < 0.01


def test_rates_across_p() -> None:
    for p in (0.05, 0.3, 0.5):
        assert abs(keep_mask((200_000,), p, seed=7).float().mean().item() - (1 - p)) < 0.005


def test_dropout_scales_kept_values_and_its_gradient_is_the_mask() -> None:
    x = torch.randn(64, 100, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.25)
    kept = y != 0
    torch.testing.assert_close(y[kept], (x[kept] / 0.75).to(torch.bfloat16))
    y.float().sum().backward()
    torch.testing.assert_close(x.grad.float(), kept.float() / 0.75, atol=1e-2, rtol=1e-2)


def test_torch_seed_repeats_the_masks_and_p_zero_is_identity() -> None:
    x = torch.ones(1000)
    torch.manual_seed(3)
    first = dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(first, dropout(x, 0.5))
    assert not torch.equal(first, dropout(x, 0.5))  # the next call draws a new seed
    assert dropout(x, 0.0) is x
