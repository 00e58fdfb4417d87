"""peft as the oracle for SEQ_CLS: a tiny BERT and a tiny Llama classifier (`score` head, padding token),
adapters crossing both ways with equal logits and the head saved in modules_to_save."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.lora.layer import ModulesToSave

from tests.helpers import randomize_lora_b, tiny_llama_config

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

PAD = 0
IDS = torch.tensor([[5, 17, 33, 9, 41, 12], [7, 22, 61, 3, PAD, PAD]])
MASK = (IDS != PAD).long()


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, num_labels=3, pad_token_id=PAD)
    return BertForSequenceClassification(config).eval()


def tiny_llama_classifier(seed: int = 0) -> nn.Module:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=PAD)).eval()


CASES = [("bert", tiny_bert, ["query", "value"], "classifier"), ("llama", tiny_llama_classifier, ["q_proj", "v_proj"], "score")]


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def randomize_head(model: nn.Module, seed: int = 2) -> None:
    """A trained head differs from the base's: change the adapter's copy."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("name, factory, targets, head", CASES, ids=[c[0] for c in CASES])
def test_lorakit_adapter_loads_in_peft(tmp_path, name, factory, targets, head):
    model = lorakit.get_peft_model(factory(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS"))
    assert isinstance(model.model.get_submodule(head), ModulesToSave)
    randomize_lora_b(model)
    randomize_head(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and head in saved["modules_to_save"]

    theirs = peft.PeftModel.from_pretrained(factory(), str(tmp_path))
    assert type(theirs).__name__ == "PeftModelForSequenceClassification"
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(factory()), expected, atol=1e-3)  # the adapter and head change the answer


@pytest.mark.parametrize("name, factory, targets, head", CASES, ids=[c[0] for c in CASES])
def test_peft_adapter_loads_in_lorakit(tmp_path, name, factory, targets, head):
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS"))
    randomize_lora_b(theirs)
    with torch.no_grad():
        getattr(theirs.base_model.model, head).modules_to_save["default"].weight.normal_(0, 0.2)
    expected = logits(theirs)
    theirs.save_pretrained(str(tmp_path))

    ours = lorakit.PeftModel.from_pretrained(factory(), tmp_path)
    assert ours.peft_config["default"].task_type == "SEQ_CLS"
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), logits(factory()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, factory, targets, head", CASES, ids=[c[0] for c in CASES])
def test_only_adapter_and_head_train_as_in_peft(name, factory, targets, head):
    ours = lorakit.get_peft_model(factory(), lorakit.LoraConfig(r=4, target_modules=targets, task_type="SEQ_CLS"))
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=4, target_modules=targets, task_type="SEQ_CLS"))
    trainable = lambda m: sorted(n.replace(".default", "") for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert [n.removeprefix("base_model.model.") for n in trainable(theirs)] == [n.removeprefix("model.") for n in trainable(ours)]


def test_all_linear_leaves_the_classifier_head_alone():
    ours = lorakit.get_peft_model(tiny_bert(), lorakit.LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    adapted = lambda m: sorted(n.split(".", 2)[-1] if n.startswith("base_model") else n.split(".", 1)[-1]  # noqa: E731
                               for n, mod in m.named_modules() if hasattr(mod, "lora_A") and isinstance(mod.lora_A, nn.ModuleDict))
    assert adapted(ours) == adapted(theirs)
    assert not any("classifier" in n for n in adapted(ours))
