"""peft as the oracle for SEQ_CLS, for every encoder family (BERT, RoBERTa, DistilBERT, DeBERTa-v2,
ModernBERT) and a Llama classifier (`score` head, padding token): targets found as peft finds them,
adapters crossing both ways with equal logits and the head saved in modules_to_save; and each family
trained a few steps through `lorakit train --task_type SEQ_CLS` from a saved base (its head new and
random), reloaded bit-equal and loaded by peft with equal logits."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
ENCODER = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, pad_token_id=PAD)


@dataclass(frozen=True)
class Family:
    name: str
    config: Callable[[], object]  # a transformers config of a tiny model
    classifier: str  # its AutoModelForSequenceClassification class, in transformers
    base: str  # the bare encoder class a pretrained checkpoint holds (no head)
    targets: list[str]  # peft's default LoRA targets for it (DistilBERT and ModernBERT: their query / value or qkv)
    heads: tuple[str, ...]  # the modules the SEQ_CLS rule trains in full

    def build(self, seed: int = 0, num_labels: int = 3) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        config = self.config()
        config.num_labels = num_labels
        return getattr(transformers, self.classifier)(config).eval()


def _bert():
    from transformers import BertConfig

    return BertConfig(**ENCODER)


def _roberta():
    from transformers import RobertaConfig

    return RobertaConfig(**ENCODER, bos_token_id=2, eos_token_id=3)


def _distilbert():
    from transformers import DistilBertConfig

    return DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, pad_token_id=PAD)


def _deberta_v2():
    from transformers import DebertaV2Config

    return DebertaV2Config(**ENCODER)


def _modernbert():
    from transformers import ModernBertConfig

    return ModernBertConfig(**ENCODER, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)


def _llama():
    return tiny_llama_config(pad_token_id=PAD)


FAMILIES = [
    Family("bert", _bert, "BertForSequenceClassification", "BertModel", ["query", "value"], ("classifier",)),
    Family("roberta", _roberta, "RobertaForSequenceClassification", "RobertaModel", ["query", "value"], ("classifier",)),
    Family("distilbert", _distilbert, "DistilBertForSequenceClassification", "DistilBertModel", ["q_lin", "v_lin"],
           ("pre_classifier", "classifier")),
    Family("deberta-v2", _deberta_v2, "DebertaV2ForSequenceClassification", "DebertaV2Model", ["query_proj", "value_proj"], ("classifier",)),
    Family("modernbert", _modernbert, "ModernBertForSequenceClassification", "ModernBertModel", ["Wqkv"], ("classifier",)),
    Family("llama", _llama, "LlamaForSequenceClassification", "LlamaModel", ["q_proj", "v_proj"], ("score",)),
]
IDS_OF = [f.name for f in FAMILIES]
ENCODERS = [f for f in FAMILIES if f.name != "llama"]


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


@pytest.mark.parametrize("family", FAMILIES, ids=IDS_OF)
def test_lorakit_adapter_loads_in_peft(tmp_path, family: Family):
    model = lorakit.get_peft_model(family.build(), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=family.targets, task_type="SEQ_CLS"))
    for head in family.heads:
        assert isinstance(model.model.get_submodule(head), ModulesToSave), head
    randomize_lora_b(model)
    randomize_head(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and family.heads[-1] in saved["modules_to_save"]

    reloaded = lorakit.PeftModel.from_pretrained(family.build(), tmp_path)
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(family.build(), str(tmp_path))
    assert type(theirs).__name__ == "PeftModelForSequenceClassification"
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(family.build()), expected, atol=1e-3)  # the adapter and head change the answer


@pytest.mark.parametrize("family", FAMILIES, ids=IDS_OF)
def test_peft_adapter_loads_in_lorakit(tmp_path, family: Family):
    theirs = peft.get_peft_model(family.build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=family.targets, task_type="SEQ_CLS"))
    randomize_lora_b(theirs)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if ".modules_to_save.default." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    expected = logits(theirs)
    theirs.save_pretrained(str(tmp_path))

    ours = lorakit.PeftModel.from_pretrained(family.build(), tmp_path)
    assert ours.peft_config["default"].task_type == "SEQ_CLS"
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)
    with ours.disable_adapter():
        torch.testing.assert_close(logits(ours), logits(family.build()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS_OF)
def test_only_adapter_and_head_train_as_in_peft(family: Family):
    ours = lorakit.get_peft_model(family.build(), lorakit.LoraConfig(r=4, target_modules=family.targets, task_type="SEQ_CLS"))
    theirs = peft.get_peft_model(family.build(), peft.LoraConfig(r=4, target_modules=family.targets, task_type="SEQ_CLS"))
    trainable = lambda m: sorted(n.replace(".default", "") for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert [n.removeprefix("base_model.model.") for n in trainable(theirs)] == [n.removeprefix("model.") for n in trainable(ours)]


def _adapted(model: nn.Module) -> list[str]:
    return sorted(n.split(".", 2)[-1] if n.startswith("base_model") else n.split(".", 1)[-1]
                  for n, mod in model.named_modules() if hasattr(mod, "lora_A") and isinstance(mod.lora_A, nn.ModuleDict))


@pytest.mark.parametrize("family", FAMILIES, ids=IDS_OF)
def test_all_linear_adapts_what_peft_adapts(tmp_path, family: Family):
    ours = lorakit.get_peft_model(family.build(), lorakit.LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    assert not any(n.split(".")[0] in family.heads for n in _adapted(ours))  # never LoRA inside the head trained in full
    if family.name == "distilbert":
        # peft cannot: "all-linear" puts LoRA on pre_classifier, which its SEQ_CLS rule also trains in full
        with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
            peft.get_peft_model(family.build(), peft.LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    else:
        theirs = peft.get_peft_model(family.build(), peft.LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
        assert _adapted(ours) == _adapted(theirs)
    randomize_lora_b(ours)
    expected = logits(ours)
    ours.save_pretrained(tmp_path)  # peft loads what lorakit saved, even where it could not make it
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(family.build(), str(tmp_path))), expected, rtol=0, atol=1e-5)


# --- trained through the CLI from a saved base, as a user's pretrained encoder ------------------------

def _tiny_tokenizer():
    """A WordPiece tokenizer over lowercase letters, digits and punctuation (73 ids, all < 128)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_lowercase + string.digits + ".,!?'-")
                                        + ["##" + c for c in string.ascii_lowercase])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS_OF)
def trained(request, tmp_path_factory) -> tuple[Family, Path, Path]:
    """(family, base directory, adapter): the bare encoder saved without a head, trained 2 steps by the CLI."""
    import transformers

    from lorakit.cli import main

    family: Family = request.param
    root = tmp_path_factory.mktemp(family.name)
    torch.manual_seed(0)
    getattr(transformers, family.base)(family.config()).save_pretrained(root / "base")
    _tiny_tokenizer().save_pretrained(root / "base")
    out = root / "run"
    assert main(["train", "--task_type", "SEQ_CLS", "--name", str(root / "base"), "--task_train_examples", "32", "--max_seq_len", "60",
                 "--task_eval_examples", "8", "--max_steps", "2", "--per_device_train_batch_size", "16", "--dtype", "float32",
                 "--bf16", "false", "--compare_base", "false", "--output_dir", str(out)]) == 0
    return family, root / "base", out / "adapter"


def _reload(base: Path, adapter: Path, seed: int):
    """The adapter on a fresh load of the base, whose new modules transformers initialises from `seed`."""
    from lorakit.infer.classify import load_classification_adapters

    torch.manual_seed(seed)
    model, _, _ = load_classification_adapters({"a": str(adapter)}, str(base), dtype="float32")
    model.set_adapter("a")
    return model.eval()


def test_a_trained_adapter_reloads_bit_equal_and_loads_in_peft(trained):
    from transformers import AutoModelForSequenceClassification

    family, base, adapter = trained
    saved = json.loads((adapter / "adapter_config.json").read_text())
    first, second = logits(_reload(base, adapter, seed=1)), logits(_reload(base, adapter, seed=2))
    # every module the checkpoint lacked is in the adapter: no random weight decides the answer
    torch.testing.assert_close(second, first, rtol=0, atol=0)

    torch.manual_seed(3)
    labels = first.shape[-1]
    theirs = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=labels), str(adapter))
    torch.testing.assert_close(logits(theirs.eval()), first, rtol=0, atol=1e-5)
    assert saved["target_modules"] and all(t in str(saved["target_modules"]) for t in family.targets)
