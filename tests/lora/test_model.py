"""LoraModel: freezing and bias modes, several named adapters, disabling, merging, unloading."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from lorakit import LoraConfig, LorakitError, get_peft_model
from lorakit.lora.layer import LoraLinear, ModulesToSave

from tests.helpers import make_tiny_llama, randomize_lora_b


ATOL = 1e-5
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def trainable(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def adapted(adapter: str = "default", **config) -> nn.Module:
    model = get_peft_model(make_tiny_llama(**config.pop("model", {})), LoraConfig(r=4, lora_alpha=8, **config), adapter)
    return model


def test_fresh_adapter_changes_nothing() -> None:
    base = logits(make_tiny_llama())
    assert torch.equal(logits(adapted(target_modules="all-linear")), base)


def test_attributes_fall_through_to_the_base_model() -> None:
    model = adapted(target_modules=["q_proj"])
    assert model.config.hidden_size == 64
    assert model.get_base_model() is model.model


def test_bias_none_trains_only_lora_weights() -> None:
    model = adapted(target_modules=["q_proj"], bias="none", model=dict(attention_bias=True))
    assert trainable(model) == {f"model.model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"}


def test_bias_lora_only_trains_the_adapted_layers_biases() -> None:
    model = adapted(target_modules=["q_proj"], bias="lora_only", model=dict(attention_bias=True))
    biases = {n for n in trainable(model) if n.endswith("bias")}
    assert biases == {f"model.model.layers.{i}.self_attn.q_proj.base_layer.bias" for i in (0, 1)}


def test_bias_all_trains_every_bias() -> None:
    model = adapted(target_modules=["q_proj"], bias="all", model=dict(attention_bias=True))
    biases = {n for n in trainable(model) if n.endswith("bias")}
    every = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert biases == every and len(every) == 8  # q (wrapped), k, v, o in two layers


def test_modules_to_save_trains_a_copy_and_keeps_the_original() -> None:
    model = adapted(target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert isinstance(model.model.lm_head, ModulesToSave)
    assert "model.lm_head.modules_to_save.default.weight" in trainable(model)
    assert "model.lm_head.original_module.weight" not in trainable(model)
    with torch.no_grad():
        model.model.lm_head.modules_to_save["default"].weight.mul_(2)
    changed = logits(model)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(make_tiny_llama()), atol=0, rtol=0)
    torch.testing.assert_close(logits(model), changed, atol=0, rtol=0)


def test_inference_mode_freezes_everything() -> None:
    model = adapted(target_modules=["q_proj"], inference_mode=True)
    assert trainable(model) == set()


def test_disable_adapter_runs_the_base_model() -> None:
    model = adapted(target_modules="all-linear")
    randomize_lora_b(model)
    base, with_lora = logits(make_tiny_llama()), logits(model)
    assert (with_lora - base).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, atol=0, rtol=0)
    torch.testing.assert_close(logits(model), with_lora, atol=0, rtol=0)


def test_disable_adapter_restores_even_after_an_exception() -> None:
    model = adapted(target_modules=["q_proj"])
    with pytest.raises(RuntimeError), model.disable_adapter():
        raise RuntimeError("inside")
    assert not any(m.disabled for m in model.modules() if isinstance(m, LoraLinear))


def test_merge_adapter_is_idempotent_and_unmerge_restores() -> None:
    model = adapted(target_modules="all-linear")
    randomize_lora_b(model)
    expected = logits(model)
    q_proj = model.model.model.layers[0].self_attn.q_proj
    base_weight = q_proj.base_layer.weight.clone()
    model.merge_adapter()
    once = q_proj.base_layer.weight.clone()
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    model.merge_adapter()
    assert torch.equal(q_proj.base_layer.weight, once)
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(q_proj.base_layer.weight, base_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), expected, atol=ATOL, rtol=0)


def test_merge_and_unload_gives_a_plain_model_with_the_same_output() -> None:
    model = adapted(target_modules="all-linear", modules_to_save=["lm_head"])
    randomize_lora_b(model)
    expected = logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in merged.modules())
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged), expected, atol=ATOL, rtol=0)


def test_unload_gives_back_the_base_model() -> None:
    model = adapted(target_modules="all-linear")
    randomize_lora_b(model)
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain), logits(make_tiny_llama()), atol=ATOL, rtol=0)


def test_safe_merge_refuses_nan_and_leaves_the_model_as_it_was() -> None:
    model = adapted(target_modules=["q_proj", "v_proj"])
    randomize_lora_b(model)
    expected = logits(model)
    lora_b = model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    kept = lora_b[0, 0].item()
    with torch.no_grad():  # break the last adapted layer, so earlier ones would be merged first
        lora_b[0, 0] = float("nan")
    with pytest.raises(LorakitError, match=r"NaN or inf weights.*model\.layers\.1\.self_attn\.v_proj|layers\.1\.self_attn\.v_proj.*NaN"):
        model.merge_and_unload(safe_merge=True)
    with pytest.raises(LorakitError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 4 and not any(m.merged_adapters for m in layers)
    with torch.no_grad():
        lora_b[0, 0] = kept
    torch.testing.assert_close(logits(model), expected, atol=0, rtol=0)  # nothing was folded in


def two_adapters() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model with adapters "a" (q, v) and "b" (all-linear), and each one's logits on its own."""
    only_a = adapted("a", target_modules=["q_proj", "v_proj"])
    randomize_lora_b(only_a, seed=1)
    only_b = adapted("b", target_modules="all-linear")
    randomize_lora_b(only_b, seed=2)
    model = adapted("a", target_modules=["q_proj", "v_proj"])
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.load_state_dict({**only_a.state_dict(), **only_b.state_dict()}, strict=False)
    return model, logits(only_a), logits(only_b)


def test_add_adapter_keeps_the_active_one() -> None:
    model, logits_a, _ = two_adapters()
    assert model.active_adapter == "a" and model.active_adapters == ["a"]
    torch.testing.assert_close(logits(model), logits_a, atol=ATOL, rtol=0)
    assert trainable(model) and all(".a." in n for n in trainable(model))


def test_set_adapter_switches_output_and_trainable_weights() -> None:
    model, logits_a, logits_b = two_adapters()
    model.set_adapter("b")
    assert model.active_adapter == "b"
    torch.testing.assert_close(logits(model), logits_b, atol=ATOL, rtol=0)
    assert trainable(model) and all(".b." in n for n in trainable(model))
    model.set_adapter("a")
    torch.testing.assert_close(logits(model), logits_a, atol=ATOL, rtol=0)


def test_set_adapter_with_an_unknown_name_lists_the_loaded_ones() -> None:
    model, _, _ = two_adapters()
    with pytest.raises(LorakitError, match="no adapter named 'c'; loaded adapters: a, b"):
        model.set_adapter("c")


def test_adding_an_existing_name_is_refused() -> None:
    model, _, _ = two_adapters()
    with pytest.raises(LorakitError, match="adapter 'b' already exists"):
        model.add_adapter("b", LoraConfig(target_modules=["q_proj"]))


def test_delete_the_active_adapter_activates_the_next() -> None:
    model, _, logits_b = two_adapters()
    model.delete_adapter("a")
    assert list(model.peft_config) == ["b"] and model.active_adapter == "b"
    assert not any(".a." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), logits_b, atol=ATOL, rtol=0)
    with pytest.raises(LorakitError, match="no adapter named 'a'"):
        model.delete_adapter("a")


def test_delete_a_merged_adapter_restores_the_base_weights() -> None:
    model, _, logits_b = two_adapters()
    model.merge_adapter()
    model.delete_adapter("a")
    torch.testing.assert_close(logits(model), logits_b, atol=ATOL, rtol=0)


def test_gradients_reach_only_the_trainable_parameters() -> None:
    model = adapted(target_modules=["q_proj", "v_proj"], bias="lora_only", model=dict(attention_bias=True))
    model.train()
    model(IDS, labels=IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable(model)
    # B starts at zero, so only B (and the bias) move on the first step; A's gradient is B^T (...) = 0.
    lora_a = model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    lora_b = model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.count_nonzero(lora_a.grad) == 0 and torch.count_nonzero(lora_b.grad) > 0


def test_dropout_only_in_training_mode() -> None:
    model = adapted(target_modules="all-linear", lora_dropout=0.5)
    randomize_lora_b(model)
    model.eval()
    assert torch.equal(logits(model), logits(model))
    model.train()
    assert not torch.equal(logits(model), logits(model))
