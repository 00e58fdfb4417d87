"""Adapter arithmetic as pure functions over (A, B) factors: DARE's seeded drops and the one-line errors
for arguments peft refuses. The combinations themselves are checked against peft in test_weighted.py."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import LorakitError
from lorakit.lora.arithmetic import AdapterFactors, combine, merge_tensors


def test_dare_with_a_generator_repeats_itself_and_keeps_the_expected_value() -> None:
    tensors = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    weights = torch.tensor([0.7, 0.3])
    first = merge_tensors(tensors, weights, "dare_linear", 0.5, generator=torch.Generator().manual_seed(5))
    again = merge_tensors(tensors, weights, "dare_linear", 0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    kept = (merge_tensors([tensors[0]], torch.tensor([1.0]), "dare_linear", 0.5, generator=torch.Generator().manual_seed(6)) != 0).float().mean()
    assert 0.45 < kept < 0.55


# --- errors: one line naming the problem and the fix ---------------------------------------------------
def fake(name: str, r: int, targets=("q_proj",)) -> AdapterFactors:
    config = lorakit.LoraConfig(r=r, lora_alpha=r, target_modules=list(targets))
    return AdapterFactors(config, {"layer.q_proj": (torch.ones(r, 8), torch.ones(8, r))}, name=name)


@pytest.mark.parametrize("call, message", [
    (lambda: combine([fake("a", 4), fake("b", 8)], [1, 1], "linear"), "needs adapters of equal rank (a r=4, b r=8); use 'cat' (exact) or 'svd'"),
    (lambda: combine([fake("a", 4), fake("b", 8)], [1, 1], "ties", density=0.5), "use 'cat' (exact) or 'svd'"),
    (lambda: combine([fake("a", 4)], [1, 1], "cat"), "1 adapters but 2 weights"),
    (lambda: combine([fake("a", 4), fake("b", 4)], [1, 1], "average"), "unknown combination_type 'average'; use one of svd, linear, cat"),
    (lambda: combine([fake("a", 4), fake("b", 4)], [1, 1], "ties"), "needs density"),
    (lambda: combine([fake("a", 4), fake("b", 4)], [1, 1], "dare_ties", density=0.0), "density must be in (0, 1]"),
    (lambda: combine([fake("a", 4), fake("b", 4)], [1, 1], "magnitude_prune", density=1.5), "density must be in (0, 1]"),
    (lambda: combine([fake("a", 4), fake("b", 4)], [1, 1], "cat", density=0.5), "density is not used by combination_type 'cat'"),
    (lambda: combine([fake("a", 4), fake("b", 4)], [1, 1], "ties", density=0.5, majority_sign_method="mean"), "majority_sign_method must be"),
    (lambda: combine([fake("a", 4), fake("b", 4)], [1, 1], "svd", svd_rank=9), "svd rank 9 exceeds the size of layer.q_proj (8 x 8)"),
    (lambda: combine([fake("a", 4), fake("b", 4)], [1, 1], "svd", svd_driver="gesvd"), "works only on CUDA"),
    (lambda: combine([], [], "cat"), "no adapters"),
    (lambda: combine([fake("a", 4), fake("b", 4)], [1, 1], "cat", svd_rank=2), "svd_rank and svd_clamp are not used by combination_type 'cat'"),
    (lambda: combine([fake("a", 4), fake("b", 4)], [1, 1], "svd", svd_rank=0), "svd_rank must be a positive integer"),
    (lambda: combine([fake("a", 4), fake("b", 4)], [1, 1], "svd", svd_clamp=1.5), "svd_clamp is a quantile"),
    (lambda: combine([fake("a", 4), AdapterFactors(lorakit.LoraConfig(r=4, target_modules="q_proj"), fake("b", 4).factors, "b")], [1, 1], "cat"), "mix a regex string and a list"),
])
def test_bad_arguments_are_one_line_errors(call, message) -> None:
    with pytest.raises(LorakitError, match=None) as caught:
        call()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_cat_on_bare_factors_is_the_exact_weighted_sum() -> None:
    generator = torch.Generator().manual_seed(0)
    first, second = (AdapterFactors(lorakit.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"]),
                                    {"layer.q_proj": (torch.randn(r, 8, generator=generator), torch.randn(8, r, generator=generator))}, name)
                     for name, r, alpha in (("a", 2, 4), ("b", 3, 3)))
    combined = combine([first, second], [0.7, -0.3], "cat")
    lora_a, lora_b = combined.factors["layer.q_proj"]
    expected = sum(w * f.scaling * f.factors["layer.q_proj"][1] @ f.factors["layer.q_proj"][0] for f, w in ((first, 0.7), (second, -0.3)))
    assert (combined.config.r, combined.config.lora_alpha, combined.scaling) == (5, 5, 1.0)
    torch.testing.assert_close(lora_b @ lora_a, expected)
