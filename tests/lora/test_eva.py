"""EVA (init_lora_weights="eva") with peft as the oracle: the same tiny Llama and the same seeded batches give
peft's lora_A, rank_pattern and alpha_pattern; the saved adapter loads in peft (and lorakit) with equal
logits; bad settings are refused in one line; `lorakit train` runs the data pass before training."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError, LorakitError
from lorakit.lora.eva import Replay, get_eva_state_dict, initialize_lora_eva_weights, token_index
from lorakit.lora.layer import LoraLinear
from lorakit.train.config import load_run_config
from tests.helpers import char_tokenizer, make_tiny_llama, randomize_lora_b
from tests.lora.test_expert import base_model_from

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {
    "defaults": dict(targets=ALL, eva={}),
    # o_proj / down_proj share no input, so whitening is peft's (its in-place division compounds on shared PCAs)
    "whiten, rho 3, no label mask": dict(targets=["o_proj", "down_proj"], eva=dict(rho=3.0, whiten=True, use_label_mask=False)),
    "unadjusted alphas, rank pattern": dict(targets=ALL, eva=dict(adjust_scaling_factors=False, tau=0.95),
                                            rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 12}),
    "dora": dict(targets=["q_proj", "v_proj", "down_proj"], eva={}, use_dora=True),
}
IDS = torch.randint(2, 128, (2, 11), generator=torch.Generator().manual_seed(5))


def make_batches(n: int = 6, seed: int = 0) -> list[dict]:
    """Padded batches with prompts (labels -100) and right padding (attention_mask 0), as a loader makes them."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 128, (4, 24), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 18:], mask[3, 10:] = 0, 0
        labels = ids.clone()
        labels[:, :5] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def peft_eva(setting: dict, batches: list[dict]):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=setting["targets"], init_lora_weights="eva",
                             eva_config=peft.tuners.lora.config.EvaConfig(**setting["eva"]),
                             rank_pattern=setting.get("rank_pattern", {}), alpha_pattern=setting.get("alpha_pattern", {}),
                             use_dora=setting.get("use_dora", False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(make_tiny_llama(), config)
        peft.initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    return model


def lorakit_eva(setting: dict, batches: list[dict]):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=setting["targets"], init_lora_weights="eva", eva_config=setting["eva"],
                        rank_pattern=setting.get("rank_pattern", {}), alpha_pattern=setting.get("alpha_pattern", {}),
                        use_dora=setting.get("use_dora", False))
    model = get_peft_model(make_tiny_llama(), config)
    return model, initialize_lora_eva_weights(model, batches)


def lora_tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapter's tensors by lorakit's key (peft's DoRA magnitude is a module with a .weight)."""
    return {k.removeprefix(prefix).replace("magnitude_vector.default.weight", "magnitude_vector.default"): v
            for k, v in state.items() if "lora_" in k}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_eva_gives_peft_s_components_ranks_and_alphas_and_the_adapter_loads_in_peft(name: str, tmp_path: Path) -> None:
    setting, batches = SETTINGS[name], make_batches()
    theirs = peft_eva(setting, batches)
    ours, config = lorakit_eva(setting, batches)
    expected = theirs.peft_config["default"]
    assert config.rank_pattern == expected.rank_pattern and config.rank_pattern  # EVA moved some ranks
    assert config.alpha_pattern == expected.alpha_pattern
    their_tensors = lora_tensors(theirs.state_dict(), "base_model.model.")
    our_tensors = lora_tensors(ours.model.state_dict())
    assert sorted(our_tensors) == sorted(their_tensors)  # the same layers kept (rank 0 ones dropped) at the same shapes
    for key, tensor in our_tensors.items():
        torch.testing.assert_close(tensor, their_tensors[key], atol=1e-5, rtol=1e-4)
        if "lora_B" in key:
            assert not tensor.any()
    for path, layer in ours.model.named_modules():  # the scaling each layer trains with is peft's
        if isinstance(layer, LoraLinear):
            assert layer.scaling["default"] == pytest.approx(theirs.get_submodule(f"base_model.model.{path}").scaling["default"])
    # trained B (random here): peft and lorakit load the saved files to the same logits as the model that saved them
    randomize_lora_b(ours.model)
    ours.save_pretrained(tmp_path / "eva")
    saved = json.loads((tmp_path / "eva" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["rho"] == setting["eva"].get("rho", 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "eva").eval()
    in_lorakit = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "eva").eval()
    reference = logits(ours.eval())
    assert (reference - logits(make_tiny_llama())).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(logits(in_peft), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(in_lorakit), reference, atol=1e-5, rtol=1e-5)


def test_a_layer_given_rank_0_loses_its_adapter_as_in_peft() -> None:
    """A large rho lets the budget pile onto a few layers: the others get rank 0 and become plain layers again."""
    setting, batches = dict(targets=ALL, eva=dict(rho=6.0, tau=0.9)), make_batches()
    theirs = peft_eva(setting, batches)
    ours, config = lorakit_eva(setting, batches)
    dropped = [p for p, m in make_tiny_llama().named_modules() if p.endswith(tuple(ALL)) and not isinstance(ours.model.get_submodule(p), LoraLinear)]
    assert dropped, "the setting should drop a layer"
    assert config.rank_pattern == theirs.peft_config["default"].rank_pattern
    assert sorted(lora_tensors(ours.model.state_dict())) == sorted(lora_tensors(theirs.state_dict(), "base_model.model."))
    assert sorted(config.target_modules) == sorted(theirs.peft_config["default"].target_modules)
    assert not set(dropped) & set(config.target_modules)


def test_the_label_and_attention_masks_choose_the_tokens_and_packed_padding_is_left_out() -> None:
    batch = make_batches(1)[0]
    kept = token_index(batch, {"use_label_mask": True, "label_mask_value": -100})
    assert len(kept) == int(((batch["attention_mask"] == 1) & (batch["labels"] != -100)).sum())
    assert len(token_index(batch, {"use_label_mask": False, "label_mask_value": -100})) == int(batch["attention_mask"].sum())
    packed = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "padding": [2, 0]}  # a packed row's trailing pad
    assert token_index(packed, {"use_label_mask": False, "label_mask_value": -100}).tolist() == [
        [0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2], [1, 3], [1, 4], [1, 5]]


def test_bad_eva_settings_and_inputs_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5, "tau": 2, "whiten": "yes", "gamma": 1})
    problems = str(caught.value)
    assert "rho must be a number >= 1" in problems and "tau must be in [0, 1]" in problems
    assert "whiten must be true or false" in problems and "no setting 'gamma'" in problems
    plain = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(LorakitError, match="init_lora_weights 'eva'"):
        initialize_lora_eva_weights(plain, make_batches(1))
    too_big = get_peft_model(make_tiny_llama(), LoraConfig(r=40, target_modules=["q_proj"], init_lora_weights="eva"))
    with pytest.raises(LorakitError, match="lower r or eva_config rho"):
        initialize_lora_eva_weights(too_big, make_batches(1))
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva"))
    with pytest.raises(LorakitError, match="no batches"):
        get_eva_state_dict(model, [])
    with pytest.raises(LorakitError, match="did not converge in 3 batches"):
        get_eva_state_dict(model, make_batches(), max_batches=3)
    for layer in model.modules():  # a refusal leaves no hooks behind
        assert not layer._forward_hooks
    with pytest.raises(ConfigError, match="causal LM training only"):
        load_run_config(None, {"task_type": "SEQ_CLS", "init_lora_weights": "eva"})


def test_eva_config_reads_and_writes_as_peft_s() -> None:
    config = LoraConfig(target_modules=["q_proj"], init_lora_weights="eva", eva_config={"rho": 1.5})
    written = config.to_peft_dict()["eva_config"]
    assert written == dataclasses.asdict(peft.tuners.lora.config.EvaConfig(rho=1.5))  # every field, peft's defaults
    newer = LoraConfig.from_peft_dict({**config.to_peft_dict(), "eva_config": {**written, "a_newer_key": 1}})
    assert newer.eva_config == written
    assert LoraConfig(target_modules=["q_proj"]).to_peft_dict()["eva_config"] is None


def test_a_replay_is_iterated_again_and_again() -> None:
    batches = make_batches(2)
    replay = Replay(lambda: iter(batches))
    assert [b["input_ids"] is a["input_ids"] for b, a in zip(list(replay) + list(replay), batches * 2)] == [True] * 4


@pytest.mark.slow
def test_lorakit_train_with_eva_starts_from_the_data_and_peft_loads_the_adapter(tmp_path: Path) -> None:
    from lorakit.cli import main

    base = tmp_path / "tiny-llama"
    make_tiny_llama(max_position_embeddings=1024).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    out = tmp_path / "run"
    code = main(["train", "--model.name", str(base), "--model.dtype", "float32", "--task_train_examples", "16",
                 "--task_eval_examples", "2", "--per_device_train_batch_size", "2", "--max_steps", "3",
                 "--learning_rate", "1e-4", "--warmup_steps", "1", "--logging_steps", "1", "--r", "4", "--lora_alpha", "8",
                 "--target_modules", "q_proj,v_proj,o_proj,down_proj", "--init_lora_weights", "eva",
                 "--eva_config", '{"tau": 0.95}', "--compare_base", "false", "--output_dir", str(out)])
    assert code == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["eva_config"]["tau"] == 0.95 and config["rank_pattern"]
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for key, tensor in tensors.items():
        path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")
        assert min(tensor.shape) == config["rank_pattern"].get(path, config["r"])
        if key.endswith("lora_A.weight"):  # EVA's rows are unit principal directions (Kaiming's have norm ~0.58);
            norms = tensor.norm(dim=1)  # three small steps move them little
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=0.05, rtol=0)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base_model_from(base), out / "adapter").eval()
    ours = PeftModel.from_pretrained(base_model_from(base), out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_eva_on_an_nf4_base_gives_peft_s_ranks_and_components(tmp_path: Path) -> None:
    """EVA reads activations only, so QLoRA bases take it as peft's do."""
    from transformers import AutoModelForCausalLM

    from lorakit import load_model
    from lorakit.quant.config import QuantConfig
    from lorakit.quant.load import bnb_config
    from tests.quant.qhelpers import save_tiny_llama

    save_tiny_llama(tmp_path / "base")
    batches = make_batches()
    ours = get_peft_model(load_model(tmp_path / "base", quantization="nf4"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights="eva"))
    config = initialize_lora_eva_weights(ours, batches)
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), quantization_config=bnb_config(QuantConfig("nf4")),
                                                dtype=torch.bfloat16, device_map={"": "cpu"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights="eva"))
        peft.initialize_lora_eva_weights(theirs, dataloader=batches, show_progress_bar=False)
    assert config.rank_pattern == theirs.peft_config["default"].rank_pattern and config.rank_pattern
    their_tensors = lora_tensors(theirs.state_dict(), "base_model.model.")
    our_tensors = lora_tensors(ours.model.state_dict())
    assert sorted(our_tensors) == sorted(their_tensors)
    for key, tensor in our_tensors.items():
        # peft re-creates a resized layer's adapter in the base's bf16 (lorakit keeps adapters fp32): equal to its rounding
        exact = their_tensors[key].dtype == torch.float32
        torch.testing.assert_close(tensor, their_tensors[key].float(), atol=1e-5 if exact else 4e-3, rtol=0)
