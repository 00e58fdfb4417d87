"""init_lora_weights and rank_pattern / alpha_pattern against peft 0.21: the same seed gives the same A, B
and (for PiSSA / OLoRA) the same rewritten base; saved adapters load both ways with equal logits; a
PiSSA adapter converted at save loads in peft on the original base."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from lorakit import ConfigError, LorakitError
from lorakit.lora.loftq import loftq_factors, low_rank

from tests.helpers import make_tiny_gpt2, make_tiny_llama, randomize_lora_b

IDS = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(3))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def pair(base=None, seed: int = 5, **config):
    base = base if base is not None else make_tiny_llama()
    values = {**dict(r=4, lora_alpha=8, target_modules=TARGETS), **config}
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**values))
    torch.manual_seed(seed)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**values))
    return theirs, ours


def parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter (base ones too) by its path in the transformers model, adapter names dropped."""
    inner = model.base_model.model if isinstance(model, peft.PeftModel) else model.model
    return {n.replace(".default", ""): p.detach() for n, p in inner.named_parameters()}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("init", [True, False, "gaussian", "pissa", "pissa_niter_2", "olora"])
def test_the_same_seed_gives_peft_s_adapter_and_base(init):
    theirs, ours = pair(init_lora_weights=init)
    expected, got = parameters(theirs), parameters(ours)
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5, msg=name)
    layer = ours.model.model.layers[0].self_attn.q_proj
    changes_output = init is False  # both random: not a no-op; every other init keeps the output
    plain = make_tiny_llama()
    assert torch.allclose(logits(ours), logits(plain), atol=1e-4) != changes_output
    if isinstance(init, str) and init.startswith(("pissa", "olora")):
        assert not torch.allclose(layer.base_layer.weight, plain.model.layers[0].self_attn.q_proj.weight)


def test_gpt2_conv1d_pissa_equals_peft():
    theirs, ours = pair(make_tiny_gpt2(), target_modules=["c_attn"], init_lora_weights="pissa", fan_in_fan_out=True)
    for name, value in parameters(theirs).items():
        torch.testing.assert_close(parameters(ours)[name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_saved_adapters_load_both_ways_on_the_original_base(tmp_path, init):
    """peft re-runs PiSSA / OLoRA when it loads such an adapter (the base becomes the residual again), and
    so does lorakit: a trained adapter gives equal logits in both after a round trip."""
    theirs, ours = pair(init_lora_weights=init)
    randomize_lora_b(theirs, 2), randomize_lora_b(ours, 2)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    expected = logits(ours.eval())
    torch.testing.assert_close(logits(theirs.eval()), expected, atol=1e-5, rtol=1e-5)
    in_peft = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ours")
    in_lorakit = lorakit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(logits(in_peft), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(in_lorakit), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_at_save_gives_peft_s_plain_lora_of_the_original_base(tmp_path, init):
    theirs, ours = pair(init_lora_weights=init)
    for name, model in (("theirs", theirs), ("ours", ours)):
        model.save_pretrained(tmp_path / name / "initial")
    randomize_lora_b(theirs, 2), randomize_lora_b(ours, 2)  # "training"
    ours.save_pretrained(tmp_path / "ours" / "final", path_initial_model_for_weight_conversion=tmp_path / "ours" / "initial")
    theirs.save_pretrained(tmp_path / "theirs" / "final", path_initial_model_for_weight_conversion=tmp_path / "theirs" / "initial")
    from safetensors.torch import load_file

    files = [load_file(tmp_path / n / "final" / "adapter_model.safetensors") for n in ("theirs", "ours")]
    assert set(files[0]) == set(files[1])
    for key, value in files[0].items():
        torch.testing.assert_close(files[1][key], value, atol=1e-6, rtol=1e-5, msg=key)
    config = lorakit.lora.peft_format.read_adapter_config(tmp_path / "ours" / "final")
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (8, 16, True)
    expected = logits(ours.eval())  # the residual base with the trained adapter
    in_peft = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ours" / "final")
    torch.testing.assert_close(logits(in_peft), expected, atol=1e-5, rtol=1e-5)
    in_lorakit = lorakit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ours" / "final")
    torch.testing.assert_close(logits(in_lorakit), expected, atol=1e-5, rtol=1e-5)


def test_conversion_refuses_what_it_cannot_convert(tmp_path):
    plain = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(target_modules=TARGETS))
    plain.save_pretrained(tmp_path / "initial")
    with pytest.raises(LorakitError, match="converts PiSSA / OLoRA adapters"):
        plain.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=tmp_path / "initial")
    pissa = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="pissa"))
    with pytest.raises(LorakitError, match=r"is \(8, 64\), not \(2, 64\) in the initial adapter"):
        pissa.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=tmp_path / "initial")
    assert not (tmp_path / "final").exists()


def test_base_rewriting_inits_are_refused_where_other_adapters_share_the_base():
    model = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    before = model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(ConfigError, match="rewrites the base weight of model.layers.0.self_attn.q_proj, which other adapters use"):
        model.add_adapter("pissa", lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))
    assert torch.equal(model.model.model.layers[0].self_attn.q_proj.base_layer.weight, before)
    assert "pissa" not in model.peft_config


def test_unknown_init_methods_are_config_errors_naming_the_choices():
    with pytest.raises(ConfigError, match="init_lora_weights 'corda' is not supported; use true, false or one of gaussian"):
        lorakit.LoraConfig(target_modules=TARGETS, init_lora_weights="corda")
    with pytest.raises(ConfigError, match="loftq_bits must be 4 or 8"):
        lorakit.LoraConfig(target_modules=TARGETS, init_lora_weights="loftq", loftq_config={"loftq_bits": 3})


def test_pissa_on_a_quantized_base_is_refused_in_one_line(tmp_path):
    from tests.quant.qhelpers import save_tiny_llama

    save_tiny_llama(tmp_path / "base")
    base = lorakit.load_model(tmp_path / "base", quantization="nf4")
    with pytest.raises(LorakitError, match="rewrites the base weights, which cannot be done on a quantized base"):
        lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"))
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # refused before any layer changed


def test_olora_on_a_non_square_conv1d_is_refused_before_anything_changes():
    model = make_tiny_gpt2()
    with pytest.raises(ConfigError, match="'olora' cannot start a 64 -> 192 Conv1D layer"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["c_proj", "c_attn"], init_lora_weights="olora"))
    assert not any(type(m).__name__ == "LoraLinear" for m in model.modules())


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_follows_peft_s_algorithm(iterations):
    """peft's loftq_init moves the weight to CUDA, so on a CPU its parts are the oracle: the base becomes
    an NF4 grid value (re-quantizing it changes nothing), B A is peft's rank-r decomposition of what
    that quantization loses, and it is closer to W than NF4 alone."""
    import bitsandbytes.functional as bnbf
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    quantized, lora_a, lora_b = loftq_factors(weight, rank=8, bits=4, iterations=iterations)
    again = bnbf.dequantize_4bit(*bnbf.quantize_4bit(quantized, blocksize=64, compress_statistics=False, quant_type="nf4"))
    torch.testing.assert_close(again, quantized, atol=0, rtol=0)
    reference = _low_rank_decomposition(weight - quantized, reduced_rank=8)
    torch.testing.assert_close(lora_b @ lora_a, reference["L"] @ reference["R"], atol=1e-5, rtol=1e-4)
    plain = bnbf.dequantize_4bit(*bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4"))
    assert (weight - quantized - lora_b @ lora_a).norm() < 0.9 * (weight - plain).norm()
    left, right = low_rank(weight, 4)
    assert torch.linalg.matrix_rank(left @ right) == 4


def test_loftq_init_sets_the_layer_and_keeps_the_output_close():
    model = make_tiny_llama()
    expected = logits(model)
    lora = lorakit.get_peft_model(copy.deepcopy(model), lorakit.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                                           init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    layer = lora.model.model.layers[0].mlp.down_proj
    original = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(layer.base_layer.weight, original)
    delta = layer.merged_weight(["default"]) - original
    assert delta.norm() < 0.9 * (layer.base_layer.weight - original).norm()
    torch.testing.assert_close(logits(lora), expected, atol=5e-2, rtol=5e-2)


def test_rank_and_alpha_patterns_equal_peft_and_round_trip(tmp_path):
    patterns = dict(rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6}, alpha_pattern={"v_proj": 3})
    theirs, ours = pair(**patterns)
    q0, v1 = ours.model.model.layers[0].self_attn.q_proj, ours.model.model.layers[1].self_attn.v_proj
    assert q0.lora_A["default"].weight.shape[0] == 2 and v1.lora_A["default"].weight.shape[0] == 6
    assert v1.scaling["default"] == 3 / 6 and ours.model.model.layers[0].mlp.down_proj.scaling["default"] == 2
    for name, value in parameters(theirs).items():
        torch.testing.assert_close(parameters(ours)[name], value, msg=name)
    randomize_lora_b(theirs, 2), randomize_lora_b(ours, 2)
    expected = logits(ours.eval())
    torch.testing.assert_close(logits(theirs.eval()), expected, atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "ours")), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(lorakit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "theirs")), expected, atol=1e-5, rtol=1e-5)


def test_adapters_of_per_layer_ranks_serve_in_one_routed_batch(tmp_path):
    """A bank slot holds the largest rank any layer of the loaded adapters has (LoraConfig.max_rank)."""
    model = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(r=2, target_modules=TARGETS, rank_pattern={"down_proj": 12}), "wide")
    model.add_adapter("narrow", lorakit.LoraConfig(r=4, target_modules=TARGETS))
    randomize_lora_b(model, 4)
    model.eval()
    assert model.slot_table.rank_width == 12
    together = model(IDS, adapter_names=["wide", "narrow"]).logits
    for row, name in enumerate(["wide", "narrow"]):
        model.set_adapter(name)
        torch.testing.assert_close(together[row], logits(model)[row], atol=1e-5, rtol=1e-5)


def test_loftq_on_an_nf4_base_starts_from_the_checkpoint_s_weights(tmp_path):
    """peft's replace_lora_weights_loftq, on a CPU: A, B from W - dequantize(Q) with W read from the base's
    checkpoint; the NF4 base is left as it is, so the adapter loads as plain LoRA (in peft too)."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    from lorakit.weights.dequant import dense_weight
    from tests.quant.qhelpers import save_tiny_llama

    save_tiny_llama(tmp_path / "base")
    ids = IDS
    with torch.no_grad():
        dense = lorakit.load_model(tmp_path / "base").float()
        truth = dense(ids).logits
        nf4 = lorakit.load_model(tmp_path / "base", quantization="nf4")
        plain_error = (nf4(ids).logits.float() - truth).abs().mean()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = lorakit.get_peft_model(nf4, lorakit.LoraConfig(r=16, lora_alpha=16, target_modules=targets, init_lora_weights="loftq"))
    layer = model.model.model.layers[0].self_attn.q_proj
    reference = _low_rank_decomposition(dense.model.layers[0].self_attn.q_proj.weight.float() - dense_weight(layer.base_layer).float(), reduced_rank=16)
    torch.testing.assert_close(layer.lora_B["default"].weight @ layer.lora_A["default"].weight, reference["L"] @ reference["R"], atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        assert (model(ids).logits.float() - truth).abs().mean() < 0.7 * plain_error
    assert model.peft_config["default"].init_lora_weights is True
    model.save_pretrained(tmp_path / "adapter")
    in_peft = peft.PeftModel.from_pretrained(lorakit.load_model(tmp_path / "base", quantization="nf4"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(in_peft(ids).logits.float(), model(ids).logits.float(), atol=1e-2, rtol=1e-2)


def test_loftq_on_a_quantized_base_refuses_what_it_cannot_do(tmp_path):
    from tests.quant.qhelpers import save_tiny_llama

    save_tiny_llama(tmp_path / "base")
    nf4 = lorakit.load_model(tmp_path / "base", quantization="nf4")
    with pytest.raises(ConfigError, match="loftq_iter > 1 re-quantizes the base"):
        lorakit.get_peft_model(nf4, lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_iter": 2}))
    int8 = lorakit.load_model(tmp_path / "base", quantization="int8")
    with pytest.raises(ConfigError, match="needs it in 4-bit"):
        lorakit.get_peft_model(int8, lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq"))
    (tmp_path / "base" / "model.safetensors").rename(tmp_path / "base" / "moved.safetensors")
    with pytest.raises(LorakitError, match="no model.safetensors in"):
        lorakit.get_peft_model(nf4, lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq"))
    assert not any(type(m).__name__ == "LoraLinear" for m in nf4.modules())


def test_no_adapter_joins_a_base_that_pissa_rewrote():
    model = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="olora"), "o")
    with pytest.raises(ConfigError, match="is the residual adapter 'o' left \\(init_lora_weights 'olora'\\)"):
        model.add_adapter("plain", lorakit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert "plain" not in model.peft_config
    model.add_adapter("elsewhere", lorakit.LoraConfig(target_modules=["v_proj"]))  # other layers are untouched
