"""A damaged adapter directory is a one-line error naming the file and the fix, never a traceback
from safetensors or json; the model is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lorakit import LoraConfig, LorakitError, PeftModel, get_peft_model
from lorakit.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter_weights
from lorakit.cli import main
from tests.helpers import make_tiny_llama, randomize_lora_b


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def overwrite(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("offset, data", [(0, b"\xff\xff\xff\x7f"), (12, b"\x00\x01\x02\x03"), (8, b"[[[[")],
                         ids=["header-length", "header-bytes", "header-json"])
def test_corrupted_weights_name_the_file_and_the_fix(adapter_dir: Path, offset: int, data: bytes) -> None:
    overwrite(adapter_dir / WEIGHTS_NAME, offset, data)
    with pytest.raises(LorakitError) as caught:
        read_adapter_weights(adapter_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{adapter_dir / WEIGHTS_NAME} is not a valid safetensors file" in message
    assert message.endswith("re-save or re-download the adapter")


def test_truncated_weights_are_refused_before_the_model_changes(adapter_dir: Path) -> None:
    path = adapter_dir / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-16])
    base = make_tiny_llama()
    names = [name for name, _ in base.named_modules()]
    with pytest.raises(LorakitError, match="is not a valid safetensors file"):
        PeftModel.from_pretrained(base, adapter_dir)
    assert [name for name, _ in base.named_modules()] == names


@pytest.mark.parametrize("text, expected", [("{\"r\": 4,", "is not valid JSON"), ("[1, 2]", "holds a JSON list"),
                                            ("\udcff", "is not valid JSON")])
def test_invalid_config_names_the_file_and_the_fix(adapter_dir: Path, text: str, expected: str) -> None:
    (adapter_dir / CONFIG_NAME).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(LorakitError) as caught:
        PeftModel.from_pretrained(make_tiny_llama(), adapter_dir)
    message = str(caught.value)
    assert "\n" not in message and str(adapter_dir / CONFIG_NAME) in message and expected in message
    assert "re-save or re-download the adapter" in message


def test_missing_config_is_named(adapter_dir: Path) -> None:
    (adapter_dir / CONFIG_NAME).unlink()
    with pytest.raises(LorakitError, match=f"no {CONFIG_NAME} in "):
        PeftModel.from_pretrained(make_tiny_llama(), adapter_dir)


def save_tiny_model_with_tokenizer(directory: Path) -> Path:
    """The tiny Llama plus a word-level tokenizer, enough for `lorakit generate` to start."""
    make_tiny_llama().save_pretrained(directory)
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="</s>").save_pretrained(directory)
    return directory


def test_generate_with_a_corrupted_adapter_is_one_line(adapter_dir: Path, tmp_path: Path, capsys) -> None:
    model_dir = save_tiny_model_with_tokenizer(tmp_path / "model")
    overwrite(adapter_dir / WEIGHTS_NAME, 0, b"\xff\xff\xff\x7f")
    capsys.readouterr()  # drop the progress bars of saving the model
    code = main(["generate", "--model", str(model_dir), "--adapter", str(adapter_dir), "--prompt", "hello",
                 "--max-new-tokens", "2", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lorakit generate: error: ") and f"{adapter_dir / WEIGHTS_NAME} is not a valid safetensors file" in err
