"""models/gguf.py: a user's GGUF file loads as the model it holds, converted once into the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.models import gguf
from lorakit.models.load import load_model, load_tokenizer, resolve_model_dir
from tests.models.tiny_gguf import write_tiny_llama_gguf

IDS = torch.tensor([[1, 5, 17, 40, 9, 88, 3]])


@pytest.fixture
def cache(monkeypatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_llama_gguf(path)


def test_a_gguf_loads_as_the_model_it_holds(cache: Path, tiny_gguf) -> None:
    path, written = tiny_gguf
    model = load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, written(IDS).logits, rtol=0, atol=0)
    tokenizer = load_tokenizer(str(path))
    ids = tokenizer("hello world").input_ids
    assert ids[0] == 1 and tokenizer.decode(ids, skip_special_tokens=True) == "hello world"
    assert tokenizer.eos_token == "</s>"


def test_it_converts_once_and_again_when_the_file_changes(cache: Path, tiny_gguf, monkeypatch) -> None:
    path, _ = tiny_gguf
    first = resolve_model_dir(path)
    assert first.parent == cache / "gguf" and (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    monkeypatch.setattr(gguf, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert resolve_model_dir(path) == first
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    with pytest.raises(pytest.fail.Exception, match="converted again"):
        resolve_model_dir(path)  # a replaced file is a different model


def test_the_cli_trains_on_a_gguf(cache: Path, tiny_gguf, tmp_path: Path) -> None:
    from lorakit.cli import main

    path, _ = tiny_gguf
    out = tmp_path / "run"
    assert main(["train", "--name", str(path), "--task_train_examples", "16", "--task_eval_examples", "2", "--max_steps", "2",
                 "--max_seq_len", "512", "--compare_base", "false", "--output_dir", str(out)]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_what_is_not_a_readable_gguf_is_one_line(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="does not exist"):
        resolve_model_dir(tmp_path / "missing.gguf")
    with pytest.raises(LorakitError, match="is not a GGUF file .it does not start with"):
        resolve_model_dir(_write(tmp_path / "notes.gguf", b"just text"))
    os.mkfifo(tmp_path / "pipe.gguf")
    with pytest.raises(LorakitError, match="is a FIFO, not a GGUF file"):
        resolve_model_dir(tmp_path / "pipe.gguf")


def test_an_architecture_transformers_cannot_read_fails_whole(cache: Path, tmp_path: Path) -> None:
    import gguf as gguf_package

    path = tmp_path / "encoder.gguf"
    writer = gguf_package.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LorakitError, match=r"transformers cannot read .*encoder.gguf as a causal LM \(.*bert"):
        resolve_model_dir(path)
    assert not any((cache / "gguf").iterdir())  # no half-converted directory left behind
