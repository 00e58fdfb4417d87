"""add_weighted_adapter on a LoraModel against peft's as the oracle, on a tiny Llama.

Three peft-made adapters with random non-zero A and B (a and b: r=4 on different target sets, c: r=8)
are loaded into peft and into lorakit; every combination type runs in both and the new adapters'
factors, deltas and logits must agree. DARE draws from torch's global generator in the same order
as peft (module by module in model order, A factors then B), so seeding both runs alike makes even
dare_* match exactly.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import LorakitError
from lorakit.lora import weighted
from lorakit.lora.layer import LoraLinear
from lorakit.lora.weighted import factors_of
from tests.helpers import make_tiny_llama, write_peft_adapter

peft = pytest.importorskip("peft")

SPECS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj", "down_proj"]),
    "c": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, config) in enumerate(SPECS.items()):
        write_peft_adapter(root / name, seed + 10, **config)
    return {name: root / name for name in SPECS}


def load_both(adapter_dirs, names):
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(adapter_dirs[names[0]]), adapter_name=names[0])
    ours = lorakit.PeftModel.from_pretrained(make_tiny_llama(), adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        theirs.load_adapter(str(adapter_dirs[name]), adapter_name=name)
        ours.load_adapter(adapter_dirs[name], adapter_name=name)
    return theirs, ours


def add_weighted_adapter(model, *args, **kwargs) -> None:
    """The PeftModel method where the model has it, else the free function it calls."""
    if "add_weighted_adapter" in type(model).__dict__:
        model.add_weighted_adapter(*args, **kwargs)
    else:
        weighted.add_weighted_adapter(model, *args, **kwargs)


def peft_factors(model, name):
    return {path: (m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach(), m.get_delta_weight(name).detach())
            for path, m in model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer) and name in m.lora_A}


def lorakit_factors(model, name):
    return {path: (m.lora_A[name].weight, m.lora_B[name].weight, m.delta_weight(name))
            for path, m in model.model.named_modules() if isinstance(m, LoraLinear) and name in m.lora_A}


def logits(model, name):
    model.set_adapter(name)
    with torch.no_grad():
        return model(input_ids=torch.arange(12).view(2, 6)).logits


CASES = [
    # (adapters, weights, combination_type, keyword arguments)
    (["a", "b"], [0.7, 0.3], "linear", {}),
    (["a", "b"], [0.7, -0.4], "linear", {}),
    (["a", "c"], [0.7, 0.3], "cat", {}),
    (["a", "b", "c"], [0.5, -0.3, 0.8], "cat", {}),
    (["a", "c"], [0.7, 0.3], "svd", {}),
    (["a", "b", "c"], [1.0, 0.5, -0.5], "svd", dict(svd_rank=6)),
    (["a", "c"], [0.7, 0.3], "svd", dict(svd_rank=3, svd_clamp=0.9, svd_full_matrices=False)),
    (["a", "b"], [0.7, 0.3], "ties", dict(density=0.5)),
    (["a", "b"], [0.7, -0.6], "ties", dict(density=0.3, majority_sign_method="frequency")),
    (["a", "b"], [0.7, 0.3], "dare_linear", dict(density=0.5)),
    (["a", "b"], [0.7, 0.3], "dare_ties", dict(density=0.6)),
    (["a", "b"], [0.7, 0.3], "magnitude_prune", dict(density=0.4)),
    (["a", "c"], [0.7, 0.3], "ties_svd", dict(density=0.5)),
    (["a", "c"], [0.7, 0.3], "dare_linear_svd", dict(density=0.5, svd_rank=5)),
    (["a", "c"], [0.7, 0.3], "dare_ties_svd", dict(density=0.7)),
    (["a", "c"], [0.7, 0.3], "magnitude_prune_svd", dict(density=0.5)),
    (["c"], [0.5], "svd", {}),  # one adapter: peft (and lorakit) combine "linear"
]


@pytest.mark.parametrize("names, weights, combination_type, kwargs", CASES,
                         ids=[f"{c[2]}-{'+'.join(c[0])}-{i}" for i, c in enumerate(CASES)])
def test_matches_peft(adapter_dirs, names, weights, combination_type, kwargs) -> None:
    theirs, ours = load_both(adapter_dirs, sorted(set(names)))
    torch.manual_seed(1234)
    theirs.add_weighted_adapter(names, weights, "mix", combination_type=combination_type, **kwargs)
    torch.manual_seed(1234)
    add_weighted_adapter(ours, names, weights, "mix", combination_type=combination_type, **kwargs)

    expected, got = peft_factors(theirs, "mix"), lorakit_factors(ours, "mix")
    assert list(got) == list(expected)
    for path, (a, b, delta) in expected.items():
        ours_a, ours_b, ours_delta = got[path]
        assert ours_a.shape == a.shape and ours_b.shape == b.shape, path
        torch.testing.assert_close(ours_delta, delta, rtol=1e-5, atol=1e-6, msg=path)
        torch.testing.assert_close(ours_a, a, rtol=1e-5, atol=1e-6, msg=path)
        torch.testing.assert_close(ours_b, b, rtol=1e-5, atol=1e-6, msg=path)
    config, peft_config = ours.peft_config["mix"], theirs.peft_config["mix"]
    assert (config.r, config.lora_alpha) == (peft_config.r, peft_config.lora_alpha)
    assert set(config.target_modules) == set(peft_config.target_modules)
    torch.testing.assert_close(logits(ours, "mix"), logits(theirs, "mix"), rtol=1e-5, atol=1e-5)


def exact_sum(model, names, weights):
    """sum_i w_i * delta_i per module, from the model's own adapters."""
    total: dict[str, torch.Tensor] = {}
    for path, m in model.model.named_modules():
        if isinstance(m, LoraLinear):
            for name, weight in zip(names, weights):
                if name in m.lora_A:
                    total[path] = total.get(path, 0) + weight * m.delta_weight(name)
    return total


def test_cat_is_the_exact_weighted_sum_and_linear_is_not(adapter_dirs) -> None:
    _, ours = load_both(adapter_dirs, ["a", "b"])
    add_weighted_adapter(ours, ["a", "b"], [0.7, 0.3], "cat", combination_type="cat")
    add_weighted_adapter(ours, ["a", "b"], [0.7, 0.3], "lin", combination_type="linear")
    expected = exact_sum(ours, ["a", "b"], [0.7, 0.3])
    cat, lin = lorakit_factors(ours, "cat"), lorakit_factors(ours, "lin")
    for path, delta in expected.items():
        torch.testing.assert_close(cat[path][2], delta, rtol=1e-5, atol=1e-6)
    shared = "model.layers.0.self_attn.v_proj"  # in both a and b: linear adds cross terms B_a A_b, B_b A_a
    assert (lin[shared][2] - expected[shared]).abs().max() > 1e-2


def test_rslora_input_gives_the_intended_delta_not_peft_s_rescaled_one(tmp_path) -> None:
    """peft copies use_rslora into the combined config, which multiplies the combined delta by sqrt(r);
    lorakit clears it, so cat stays the exact weighted sum."""
    write_peft_adapter(tmp_path / "rs", 3, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    model = lorakit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "rs", adapter_name="rs")
    add_weighted_adapter(model, ["rs"], [0.5], "halved", combination_type="linear")
    assert model.peft_config["halved"].use_rslora is False
    expected = exact_sum(model, ["rs"], [0.5])
    for path, (_, _, delta) in lorakit_factors(model, "halved").items():
        torch.testing.assert_close(delta, expected[path], rtol=1e-5, atol=1e-6)


def test_model_errors_leave_the_model_unchanged(adapter_dirs) -> None:
    _, ours = load_both(adapter_dirs, ["a", "c"])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(LorakitError, match="equal rank"):
        add_weighted_adapter(ours, ["a", "c"], [1, 1], "mix", combination_type="linear")
    with pytest.raises(LorakitError, match="no adapter named 'z'; loaded adapters: a, c"):
        add_weighted_adapter(ours, ["a", "z"], [1, 1], "mix", combination_type="cat")
    with pytest.raises(LorakitError, match="already exists"):
        add_weighted_adapter(ours, ["a", "c"], [1, 1], "c", combination_type="cat")
    assert list(ours.peft_config) == ["a", "c"]
    after = ours.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_factors_of_reads_views_with_the_config_scaling(adapter_dirs) -> None:
    _, ours = load_both(adapter_dirs, ["b"])
    factors = factors_of(ours, "b")
    assert factors.scaling == 16 / 4 and len(factors.factors) == 3 * 2
    path = "model.layers.1.mlp.down_proj"
    assert factors.factors[path][0].shape == (4, 128) and factors.factors[path][1].shape == (64, 4)


@pytest.mark.parametrize("combination_type, kwargs", [("cat", {}), ("svd", dict(svd_rank=3)), ("ties", dict(density=0.5))])
def test_gpt2_conv1d_matches_peft(tmp_path, combination_type, kwargs) -> None:
    """GPT-2 stores Conv1D weights as (in, out); the factors are (r, in) / (out, r) all the same."""
    from tests.helpers import make_tiny_gpt2

    for seed, name in enumerate("xy"):
        model = peft.get_peft_model(make_tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
        generator = torch.Generator().manual_seed(seed + 30)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        model.save_pretrained(str(tmp_path / name))
    theirs = peft.PeftModel.from_pretrained(make_tiny_gpt2(), str(tmp_path / "x"), adapter_name="x")
    theirs.load_adapter(str(tmp_path / "y"), adapter_name="y")
    ours = lorakit.PeftModel.from_pretrained(make_tiny_gpt2(), tmp_path / "x", adapter_name="x")
    ours.load_adapter(tmp_path / "y", adapter_name="y")
    theirs.add_weighted_adapter(["x", "y"], [0.8, -0.5], "mix", combination_type=combination_type, **kwargs)
    add_weighted_adapter(ours, ["x", "y"], [0.8, -0.5], "mix", combination_type=combination_type, **kwargs)
    expected, got = peft_factors(theirs, "mix"), lorakit_factors(ours, "mix")
    assert list(got) == list(expected)
    for path, (_, _, delta) in expected.items():
        torch.testing.assert_close(got[path][2], delta, rtol=1e-5, atol=1e-6, msg=path)
    torch.testing.assert_close(logits(ours, "mix"), logits(theirs, "mix"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first, module, verb", [("d", "v_proj", "skip"), ("a", "o_proj", "adapt")])
def test_a_config_that_would_change_the_adapted_layers_is_refused(adapter_dirs, tmp_path, first, module, verb) -> None:
    """peft copies the first adapter's exclude_modules: it silently drops a layer only the others adapt,
    or adds one none of them adapts (and then crashes). lorakit refuses before touching the model."""
    excluded = f"model.layers.0.self_attn.{module}"
    write_peft_adapter(tmp_path / "d", 7, r=4, lora_alpha=8, target_modules=[module], exclude_modules=[excluded])
    ours = lorakit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "d", adapter_name="d")
    ours.load_adapter(adapter_dirs["a"], adapter_name="a")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    names = ["d", "a"] if first == "d" else ["a", "d"]
    with pytest.raises(LorakitError, match=rf"would {verb} {excluded}, unlike the inputs; give the adapters the same exclude_modules"):
        add_weighted_adapter(ours, names, [0.5, 0.5], "mix", combination_type="cat")
    assert list(ours.peft_config) == ["d", "a"]
    after = ours.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
