"""peft as the oracle on the default model (SmolLM2-135M, tied embeddings): the README's report, and one
adapter crossing both ways. Few tests and short inputs: each load is a 135M-parameter model."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit

from tests.helpers import randomize_lora_b

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
IDS = torch.tensor([[1, 504, 3458, 314, 253, 1789, 30]])


@pytest.fixture
def load_default(default_model_dir: Path):
    return lambda: lorakit.load_model("default")


def report(model: nn.Module) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    return out.getvalue()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_qkvo_r16_report_is_the_readme_s_and_peft_s(load_default) -> None:
    expected = "trainable params: 1,843,200 || all params: 136,358,208 || trainable%: 1.3517\n"
    ours = lorakit.get_peft_model(load_default(), lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=QKVO))
    theirs = peft.get_peft_model(load_default(), peft.LoraConfig(r=16, lora_alpha=32, target_modules=QKVO))
    assert report(ours) == expected
    assert report(theirs) == expected


def test_all_linear_report_is_peft_s(load_default) -> None:
    ours = lorakit.get_peft_model(load_default(), lorakit.LoraConfig(r=16, target_modules="all-linear"))
    theirs = peft.get_peft_model(load_default(), peft.LoraConfig(r=16, target_modules="all-linear"))
    assert report(ours) == report(theirs)
    assert report(ours) == "trainable params: 4,884,480 || all params: 139,399,488 || trainable%: 3.5039\n"


def test_adapters_cross_both_ways_and_merges_agree(tmp_path: Path, load_default) -> None:
    config = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = lorakit.get_peft_model(load_default(), lorakit.LoraConfig(**config))
    randomize_lora_b(ours, seed=1)
    expected = logits(ours)
    ours.save_pretrained(tmp_path / "ours")

    # (a) lorakit's adapter in peft, and (c) both merges of it.
    theirs = peft.PeftModel.from_pretrained(load_default(), str(tmp_path / "ours"))
    assert (logits(theirs) - expected).abs().max().item() < 1e-5
    ours_merged = ours.merge_and_unload().state_dict()
    theirs_merged = theirs.merge_and_unload().state_dict()
    assert ours_merged.keys() == theirs_merged.keys()
    assert max((ours_merged[k] - theirs_merged[k]).abs().max().item() for k in ours_merged) < 1e-5

    # (b) peft's adapter in lorakit.
    theirs = peft.get_peft_model(load_default(), peft.LoraConfig(**config))
    randomize_lora_b(theirs, seed=2)
    expected = logits(theirs)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = lorakit.PeftModel.from_pretrained(load_default(), tmp_path / "theirs")
    assert (logits(loaded) - expected).abs().max().item() < 1e-5
