"""LoRA on parameters (peft's target_parameters) with peft as the oracle: fused 3-D MoE experts of tiny
Mixtral, Qwen3-MoE and gpt-oss models (transformers' own config classes), a router's 2-D weight, rank_pattern,
"all-linear", the files both ways, merging, and training through the CLI."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError
from lorakit.lora.expert import ParamLora
from lorakit.lora.peft_format import adapter_state_dict
from tests.helpers import char_tokenizer
from tests.infer.test_decoder import tiny_family

peft = pytest.importorskip("peft")

MOE = dict(num_local_experts=4, num_experts_per_tok=2)
FAMILIES = {
    "MixtralConfig": dict(MOE, sliding_window=None),
    "Qwen3MoeConfig": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1),
    "GptOssConfig": MOE,  # experts stored transposed, (E, in, out), with biases
}
SETTINGS = {
    "experts": dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    "rank_pattern": dict(target_modules=["v_proj"], target_parameters=["gate_up_proj", "down_proj"],
                         rank_pattern={"gate_up_proj": 2}, alpha_pattern={"down_proj": 3}),
    "all-linear": dict(target_modules="all-linear"),
    "parameters only": dict(target_parameters=["experts.down_proj"]),
    # transformers 4's expert names (Mixtral's w1 / w3, Qwen-MoE's gate_proj / up_proj / down_proj): peft maps them
    "v4 names": dict(target_modules=["q_proj", "w1", "w3", "gate_proj", "up_proj", "down_proj"]),
}
IDS = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(7))


def base_model(config_class: str):
    return tiny_family(config_class, **FAMILIES[config_class])


def peft_model(config_class: str, setting: str, seed: int = 1):
    """peft's model for the setting, every A and B random (so each expert's pair matters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base_model(config_class), peft.LoraConfig(r=4, lora_alpha=8, **SETTINGS[setting]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("config_class", sorted(FAMILIES))
def test_peft_adapters_load_with_equal_logits_and_save_back_to_peft(config_class: str, setting: str, tmp_path: Path) -> None:
    reference = peft_model(config_class, setting)
    reference.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(base_model(config_class), tmp_path / "peft").eval()
    expected = logits(reference)
    assert (expected - logits(base_model(config_class))).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=1e-5)
    # lorakit's files: the same keys and shapes as peft's, loaded by peft with the same logits
    ours.save_pretrained(tmp_path / "ours")
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mine = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    reloaded = peft.PeftModel.from_pretrained(base_model(config_class), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config_class", sorted(FAMILIES))
def test_fresh_adapters_inject_as_peft_does(config_class: str) -> None:
    """Same modules wrapped, same nesting (the first registered parameter innermost), same tensor names and
    shapes, the same config as peft saves it; a fresh adapter changes nothing (B = 0)."""
    for setting in SETTINGS:
        reference = peft_model(config_class, setting)
        ours = get_peft_model(base_model(config_class), LoraConfig(r=4, lora_alpha=8, **SETTINGS[setting]))
        theirs = {k: v.shape for k, v in peft.get_peft_model_state_dict(reference).items()}
        assert {k: v.shape for k, v in adapter_state_dict(ours.model, "default", "none").items()} == theirs, setting
        saved, expected = ours.peft_config["default"].to_peft_dict(), reference.peft_config["default"].to_dict()
        assert sorted(saved["target_parameters"] or []) == sorted(expected["target_parameters"] or []), setting
        assert saved["rank_pattern"] == expected["rank_pattern"] and saved["alpha_pattern"] == expected["alpha_pattern"], setting
        torch.testing.assert_close(logits(ours), logits(base_model(config_class)), atol=0, rtol=0)


def test_all_linear_adapts_the_experts_and_router_of_fused_moe_families_as_peft_does() -> None:
    """transformers 5 fused Mixtral's / Qwen3-MoE's expert linears; peft's "all-linear" still adapts them
    (and the router) through target_parameters, with gate_up_proj at twice the rank. gpt-oss: attention only."""
    for config_class, parameters in (("MixtralConfig", ["down_proj", "gate.weight", "gate_up_proj"]),
                                     ("Qwen3MoeConfig", ["down_proj", "gate.weight", "gate_up_proj"]), ("GptOssConfig", None)):
        config = get_peft_model(base_model(config_class), LoraConfig(r=4, target_modules="all-linear")).peft_config["default"]
        assert config.target_parameters == parameters
        assert sorted(config.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    model = get_peft_model(base_model("MixtralConfig"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    experts = model.model.model.layers[0].mlp.experts
    assert (experts.parameter_name, experts.base_layer.parameter_name) == ("down_proj", "gate_up_proj")
    assert experts.base_layer.r == {"default": 8} and experts.base_layer.scaling == {"default": 2.0}


@pytest.mark.parametrize("config_class", sorted(FAMILIES))
def test_merge_and_unload_equals_the_adapter_and_unload_gives_the_base_back(config_class: str, tmp_path: Path) -> None:
    peft_model(config_class, "experts").save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(base_model(config_class), tmp_path).eval()
    expected = logits(model)
    model.merge_adapter()  # in place, still wrapped
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(base_model(config_class)), atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    merged = model.merge_and_unload(safe_merge=True)
    assert not [m for m in merged.modules() if isinstance(m, ParamLora)]
    assert type(merged.model.layers[0].mlp.experts).__name__.endswith("Experts")
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)
    reference = peft_model(config_class, "experts").merge_and_unload()
    torch.testing.assert_close(merged.model.layers[1].mlp.experts.gate_up_proj, reference.model.layers[1].mlp.experts.gate_up_proj,
                               atol=1e-6, rtol=1e-6)
    unloaded = PeftModel.from_pretrained(base_model(config_class), tmp_path).unload()
    torch.testing.assert_close(logits(unloaded), logits(base_model(config_class)), atol=0, rtol=0)


def test_a_second_adapter_reuses_the_wrappers_and_adapters_switch_and_delete(tmp_path: Path) -> None:
    peft_model("MixtralConfig", "experts", seed=1).save_pretrained(tmp_path / "one")
    peft_model("MixtralConfig", "experts", seed=2).save_pretrained(tmp_path / "two")
    model = PeftModel.from_pretrained(base_model("MixtralConfig"), tmp_path / "one", adapter_name="one").eval()
    model.load_adapter(tmp_path / "two", adapter_name="two")
    assert len([m for m in model.modules() if isinstance(m, ParamLora)]) == 2 * 2  # two layers, two parameters each
    one = logits(model)
    model.set_adapter("two")
    torch.testing.assert_close(logits(model), logits(PeftModel.from_pretrained(base_model("MixtralConfig"), tmp_path / "two")), atol=1e-5, rtol=1e-5)
    assert (logits(model) - one).abs().max() > 1e-2
    model.delete_adapter("two")
    torch.testing.assert_close(logits(model), one, atol=1e-5, rtol=1e-5)


def test_bad_target_parameters_are_refused_in_one_line_and_leave_the_model_unchanged() -> None:
    model = base_model("MixtralConfig")
    before = [type(m) for m in model.modules()]
    with pytest.raises(ConfigError, match=r"'experts\.gate_proj' match no parameter.*3-D parameters in this model: down_proj, gate_up_proj"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.gate_proj"]))
    with pytest.raises(ConfigError, match="targeted by target_modules and its parameter by target_parameters"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]))
    assert [type(m) for m in model.modules()] == before
    with pytest.raises(ConfigError, match="names w1 without w3, which transformers fused with it into experts.gate_up_proj"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "w1"]))
    with pytest.raises(ConfigError, match="lora_dropout must be 0 with target_parameters"):
        LoraConfig(target_parameters=["experts.down_proj"], lora_dropout=0.1)
    with pytest.raises(ConfigError, match="target_parameters must be a list"):
        LoraConfig(target_parameters=[3])


def test_a_router_weight_is_a_2d_parameter_lora() -> None:
    reference = peft.get_peft_model(base_model("MixtralConfig"), peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["gate.weight"]))
    ours = get_peft_model(base_model("MixtralConfig"), LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["gate.weight"]))
    router = ours.model.model.layers[0].mlp.gate
    assert isinstance(router, ParamLora) and router.num_experts == 1 and router.lora_A["default"].weight.shape == (2, 64)
    assert {k: v.shape for k, v in adapter_state_dict(ours.model, "default", "none").items()} == \
        {k: v.shape for k, v in peft.get_peft_model_state_dict(reference).items()}


# --- training through the CLI -------------------------------------------------------------------------
@pytest.mark.slow
def test_lorakit_train_adapts_the_experts_and_peft_loads_the_result(tmp_path: Path) -> None:
    from lorakit.cli import main

    base = tmp_path / "tiny-mixtral"
    tiny_family("MixtralConfig", **FAMILIES["MixtralConfig"], max_position_embeddings=1024).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    out = tmp_path / "run"
    code = main(["train", "--model.name", str(base), "--model.dtype", "float32", "--task_train_examples", "16",
                 "--task_eval_examples", "2", "--per_device_train_batch_size", "2", "--max_steps", "4",
                 "--learning_rate", "5e-3", "--warmup_steps", "1", "--logging_steps", "1", "--target_modules", "q_proj,v_proj",
                 "--target_parameters", "experts.gate_up_proj,experts.down_proj", "--output_dir", str(out)])
    assert code == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    trained = tensors["base_model.model.model.layers.0.mlp.experts.lora_B.weight"]
    assert trained.shape == (64, 16 * 4) and trained.abs().max() > 0  # B left zero would mean no gradient reached it
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    ours = PeftModel.from_pretrained(base_model_from(base), out / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(base_model_from(base), out / "adapter").eval()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 4
    # `lorakit merge` folds the experts' adapters in: a plain transformers model with the adapter's logits
    assert main(["merge", str(out / "adapter"), "--output", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    torch.testing.assert_close(logits(base_model_from(tmp_path / "merged"), ids), logits(ours, ids), atol=1e-5, rtol=1e-5)


def base_model_from(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_copying_a_model_with_expert_adapters_keeps_them() -> None:
    """deepcopy (the engine's oracle copies, FSDP wrapping) must not lose the wrapper's attribute fall-through."""
    model = get_peft_model(base_model("MixtralConfig"), LoraConfig(target_parameters=["experts.down_proj"]))
    clone = copy.deepcopy(model)
    assert clone.model.model.layers[0].mlp.experts.num_experts == 4


def test_init_lora_weights_false_and_gaussian_as_peft_and_the_rest_refused() -> None:
    ours = get_peft_model(base_model("MixtralConfig"), LoraConfig(r=4, target_parameters=["experts.down_proj"], init_lora_weights="gaussian"))
    experts = ours.model.model.layers[0].mlp.experts
    assert torch.equal(experts.lora_B["default"].weight, torch.zeros_like(experts.lora_B["default"].weight))
    assert abs(experts.lora_A["default"].weight.std().item() - 1 / 4) < 0.02  # peft: normal with std 1 / r
    random = get_peft_model(base_model("MixtralConfig"), LoraConfig(r=4, target_parameters=["experts.down_proj"], init_lora_weights=False))
    assert (logits(random) - logits(base_model("MixtralConfig"))).abs().max() > 1e-4  # not a no-op, as in peft
    for refused in (dict(init_lora_weights="olora"), dict(use_dora=True)):
        with pytest.raises(ConfigError, match="target_parameters"):
            get_peft_model(base_model("MixtralConfig"), LoraConfig(target_modules=["q_proj"], target_parameters=["experts.down_proj"], **refused))
