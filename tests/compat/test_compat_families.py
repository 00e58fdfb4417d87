"""peft as the oracle on a tiny random model of every family the engine runs: LoRA targets found as
peft finds them, a lorakit adapter loads in peft with equal logits, merging equals the adapter, and
`lorakit train` trains a few steps of each through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import main
from tests.helpers import char_tokenizer, randomize_lora_b
from tests.infer.test_families import FAMILY_CONFIGS, family_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

IDS = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
FAMILIES = sorted(FAMILY_CONFIGS)
TARGET_SETS = {"all-linear": "all-linear", "attention": ["q_proj", "v_proj", "qkv_proj", "o_proj"]}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def adapted(model) -> set[str]:
    """Names of the transformers model's modules that carry LoRA (lorakit's LoraModel.model, peft's base_model.model)."""
    inner = model.base_model.model if isinstance(model, peft.PeftModel) else model.model
    return {name for name, module in inner.named_modules() if hasattr(module, "lora_A") and len(module.lora_A) > 0}


@pytest.mark.parametrize("targets", sorted(TARGET_SETS))
@pytest.mark.parametrize("config_class", FAMILIES)
def test_targets_are_peft_s_and_the_adapter_loads_in_peft_with_equal_logits(config_class: str, targets: str, tmp_path: Path) -> None:
    target_modules = TARGET_SETS[targets]
    if isinstance(target_modules, list):  # the names this family has (Phi-3 fuses q, k, v into qkv_proj)
        names = {n.rsplit(".", 1)[-1] for n, _ in family_model(config_class).named_modules()}
        target_modules = [t for t in target_modules if t in names]
    ours = lorakit.get_peft_model(family_model(config_class), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    theirs = peft.get_peft_model(family_model(config_class), peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    assert adapted(ours) == adapted(theirs) and adapted(ours)
    randomize_lora_b(ours, 5)
    ours.eval().save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(family_model(config_class), tmp_path / "adapter").eval()
    expected = logits(ours)
    assert (expected - logits(family_model(config_class))).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(ours.merge_and_unload()), expected, atol=1e-5, rtol=1e-5)


# The training loop is one for every family; these three carry what differs most in training (fused
# projections, sliding layers and (1 + w) norms, MoE experts with sinks). Llama's runs in tests/e2e and
# Mixtral's in tests/lora/test_expert.py. (Each run is ~15 s on an idle machine.)
@pytest.mark.slow
@pytest.mark.parametrize("config_class", ["Gemma3TextConfig", "Phi3Config", "GptOssConfig"])
def test_lorakit_train_runs_on_the_family_through_the_cli(config_class: str, tmp_path: Path) -> None:
    base = tmp_path / "base"
    model = family_model(config_class)
    model.config.max_position_embeddings = 1024  # the shipped task's prompts are ~220 characters, one token each here
    model.save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    out = tmp_path / "run"
    code = main(["train", "--model.name", str(base), "--model.dtype", "float32", "--task_train_examples", "4",
                 "--task_eval_examples", "2", "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "5e-3",
                 "--warmup_steps", "0", "--logging_steps", "1", "--target_modules", "all-linear", "--output_dir", str(out)])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    loaded = peft.PeftModel.from_pretrained(family_model(config_class), out / "adapter").eval()
    ours = lorakit.PeftModel.from_pretrained(family_model(config_class), out / "adapter").eval()
    torch.testing.assert_close(logits(loaded), logits(ours), atol=1e-5, rtol=1e-5)
