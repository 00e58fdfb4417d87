"""train/run.py's choices before training."""

from __future__ import annotations

from pathlib import Path

from lorakit.train.run import packs_within_examples
from tests.helpers import make_tiny_llama


def test_rows_are_packed_only_for_models_whose_attention_lorakit_keeps_within_examples(tmp_path: Path) -> None:
    from transformers import StableLmConfig, StableLmForCausalLM

    make_tiny_llama().save_pretrained(tmp_path / "llama")
    StableLmForCausalLM(StableLmConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=4)).save_pretrained(tmp_path / "stablelm")
    notices: list[str] = []
    assert packs_within_examples(str(tmp_path / "llama"), notices.append) and not notices
    assert not packs_within_examples(str(tmp_path / "stablelm"), notices.append)
    assert len(notices) == 1 and "StableLmForCausalLM attends outside" in notices[0] and "one example per row" in notices[0]
