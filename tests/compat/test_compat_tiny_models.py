"""peft as the oracle, on a tiny Llama and a tiny GPT-2: adapters cross both ways with the same logits,
merges agree, and the parameter report is peft's to the character."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import lorakit

from tests.helpers import make_tiny_gpt2, make_tiny_llama, randomize_lora_b


peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TOLERANCE = 1e-5
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def tiny_llama_with_bias() -> nn.Module:
    return make_tiny_llama(attention_bias=True)


# (id, base model factory, LoraConfig keyword arguments shared by lorakit and peft)
CASES: list[tuple[str, Callable[[], nn.Module], dict]] = [
    ("llama-qv", make_tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    ("llama-all-linear", make_tiny_llama, dict(target_modules="all-linear")),
    ("llama-bias-all", tiny_llama_with_bias, dict(target_modules=["q_proj", "v_proj"], bias="all")),
    ("llama-bias-lora-only", tiny_llama_with_bias, dict(target_modules=["q_proj", "v_proj"], bias="lora_only")),
    ("llama-bias-none", tiny_llama_with_bias, dict(target_modules=["q_proj", "o_proj"], bias="none")),
    ("llama-modules-to-save", make_tiny_llama, dict(target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"])),
    ("llama-rslora", make_tiny_llama, dict(target_modules=["q_proj", "up_proj"], use_rslora=True, lora_alpha=16)),
    ("llama-regex", make_tiny_llama, dict(target_modules=r".*layers\.1\.(self_attn\.(q|k)|mlp\.down)_proj")),
    ("llama-exclude", make_tiny_llama, dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"])),
    ("llama-exclude-regex", make_tiny_llama, dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*")),
    ("gpt2-conv1d", make_tiny_gpt2, dict(target_modules=["c_attn", "c_proj"])),
    ("gpt2-fan-in-fan-out", make_tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    ("gpt2-all-linear-bias-all", make_tiny_gpt2, dict(target_modules="all-linear", bias="all")),
]


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def report(model: nn.Module) -> str:
    """What print_trainable_parameters prints, captured."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    return out.getvalue()


def train_a_little(model: nn.Module, seed: int) -> nn.Module:
    """Stand-in for training: random non-zero B, shifted trainable biases, scaled modules_to_save copies."""
    randomize_lora_b(model, seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and param.requires_grad:
                param.add_(0.05 * seed)
            elif ".modules_to_save." in name:
                param.mul_(1.5)
    return model


def lorakit_adapted(make_base: Callable[[], nn.Module], kwargs: dict, seed: int = 1) -> nn.Module:
    return train_a_little(lorakit.get_peft_model(make_base(), lorakit.LoraConfig(r=4, **kwargs)), seed)


def peft_adapted(make_base: Callable[[], nn.Module], kwargs: dict, seed: int = 2) -> nn.Module:
    return train_a_little(peft.get_peft_model(make_base(), peft.LoraConfig(r=4, **kwargs)), seed)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(("make_base", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lorakit_adapter_loads_in_peft(tmp_path: Path, make_base: Callable, kwargs: dict) -> None:
    ours = lorakit_adapted(make_base, kwargs)
    expected = logits(ours)
    assert max_diff(expected, logits(make_base())) > 1e-3  # the adapter really changes the output
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make_base(), str(tmp_path))
    assert max_diff(logits(theirs), expected) < TOLERANCE


@pytest.mark.parametrize(("make_base", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_peft_adapter_loads_in_lorakit(tmp_path: Path, make_base: Callable, kwargs: dict) -> None:
    theirs = peft_adapted(make_base, kwargs)
    expected = logits(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = lorakit.PeftModel.from_pretrained(make_base(), tmp_path)
    assert max_diff(logits(ours), expected) < TOLERANCE
    with ours.disable_adapter(), theirs.disable_adapter():
        assert max_diff(logits(ours), logits(theirs)) < TOLERANCE


@pytest.mark.parametrize(("make_base", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_merged_models_agree(tmp_path: Path, make_base: Callable, kwargs: dict) -> None:
    ours = lorakit_adapted(make_base, kwargs)
    expected = logits(ours)
    ours.save_pretrained(tmp_path)
    ours_merged = ours.merge_and_unload()
    theirs_merged = peft.PeftModel.from_pretrained(make_base(), str(tmp_path)).merge_and_unload()
    ours_state, theirs_state = ours_merged.state_dict(), theirs_merged.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    assert max(max_diff(ours_state[k], theirs_state[k]) for k in ours_state) < TOLERANCE
    assert max_diff(logits(ours_merged), expected) < TOLERANCE


@pytest.mark.parametrize(("make_base", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parameter_report_is_peft_s(tmp_path: Path, make_base: Callable, kwargs: dict) -> None:
    ours = lorakit.get_peft_model(make_base(), lorakit.LoraConfig(r=4, **kwargs))
    theirs = peft.get_peft_model(make_base(), peft.LoraConfig(r=4, **kwargs))
    assert report(ours) == report(theirs)
    assert report(ours).startswith("trainable params: ") and report(ours).endswith("\n")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    # ...and after loading the saved adapter, frozen and trainable.
    theirs.save_pretrained(str(tmp_path))
    for is_trainable in (False, True):
        loaded_ours = lorakit.PeftModel.from_pretrained(make_base(), tmp_path, is_trainable=is_trainable)
        loaded_theirs = peft.PeftModel.from_pretrained(make_base(), str(tmp_path), is_trainable=is_trainable)
        assert report(loaded_ours) == report(loaded_theirs)


@pytest.mark.parametrize(("make_base", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_same_parameters_train(make_base: Callable, kwargs: dict) -> None:
    ours = lorakit.get_peft_model(make_base(), lorakit.LoraConfig(r=4, **kwargs))
    theirs = peft.get_peft_model(make_base(), peft.LoraConfig(r=4, **kwargs))
    ours_names = {n for n, p in ours.named_parameters() if p.requires_grad}
    # peft's names carry one more prefix: base_model.model.<...> where lorakit has model.<...>
    theirs_names = {n.removeprefix("base_model.") for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_names == theirs_names


@pytest.mark.parametrize(("make_base", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_saved_tensors_have_peft_s_keys(tmp_path: Path, make_base: Callable, kwargs: dict) -> None:
    from safetensors.torch import load_file

    lorakit.get_peft_model(make_base(), lorakit.LoraConfig(r=4, **kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(make_base(), peft.LoraConfig(r=4, **kwargs)).save_pretrained(str(tmp_path / "theirs"))
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_fresh_adapters_agree_on_the_base_output() -> None:
    ours = lorakit.get_peft_model(make_tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    theirs = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(r=4, target_modules="all-linear"))
    assert max_diff(logits(ours), logits(theirs)) == 0.0


def test_second_adapter_from_peft_matches_peft_set_adapter(tmp_path: Path) -> None:
    first = peft_adapted(make_tiny_llama, dict(target_modules=["q_proj", "v_proj"]), seed=1)
    second = peft_adapted(make_tiny_llama, dict(target_modules=["k_proj", "down_proj"]), seed=2)
    first.save_pretrained(str(tmp_path / "first"))
    second.save_pretrained(str(tmp_path / "second"))
    ours = lorakit.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "first")
    ours.load_adapter(tmp_path / "second", adapter_name="second")
    theirs = peft.PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "first"))
    theirs.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert max_diff(logits(ours), logits(theirs)) < TOLERANCE
    ours.set_adapter("second")
    theirs.set_adapter("second")
    assert max_diff(logits(ours), logits(second)) < TOLERANCE
    assert max_diff(logits(ours), logits(theirs)) < TOLERANCE
    assert report(ours) == report(theirs)
