"""`lorakit serve`'s choice of base: an adapter trained on a quantized base (QLoRA) is served on that base."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit.commands.serve import base_quantization
from lorakit.errors import LorakitError
from lorakit.infer.engine import Engine
from lorakit.infer.sampling import SamplingParams
from lorakit.quant.config import QuantConfig
from lorakit.quant.record import write_quant_record
from tests.helpers import ToyTokenizer, randomize_lora_b


def adapter(directory: Path, name: str, quantization: str | None) -> SimpleNamespace:
    directory.mkdir(parents=True)
    if quantization:
        write_quant_record(directory, QuantConfig(quantization=quantization))
    return SimpleNamespace(name=name, directory=directory)


def test_the_recorded_base_is_chosen_with_a_notice_and_an_explicit_choice_wins(tmp_path: Path) -> None:
    qlora = [adapter(tmp_path / "a", "a", "nf4"), adapter(tmp_path / "b", "b", "nf4")]
    config, notice = base_quantization(None, qlora)
    assert config.quantization == "nf4" and "trained on a nf4 base" in notice and "--quantization none" in notice
    assert not base_quantization("none", qlora)[0].enabled
    assert base_quantization("int8", qlora)[0].quantization == "int8"
    plain = base_quantization(None, [adapter(tmp_path / "c", "c", None)])
    assert not plain[0].enabled and plain[1] is None


def test_adapters_trained_on_different_bases_are_refused_in_one_line(tmp_path: Path) -> None:
    mixed = [adapter(tmp_path / "a", "a", "nf4"), adapter(tmp_path / "b", "b", None)]
    with pytest.raises(LorakitError, match="trained on different bases .*a: nf4.*b: none.*--quantization") as refused:
        base_quantization(None, mixed)
    assert "\n" not in str(refused.value)


def test_a_qlora_adapter_served_on_its_nf4_base_gives_lorakit_s_generate_tokens(tmp_path: Path) -> None:
    from tests.quant.qhelpers import save_tiny_llama

    save_tiny_llama(tmp_path / "base")
    base = lorakit.load_model(tmp_path / "base", quantization="nf4", dtype=torch.bfloat16)
    lora = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    randomize_lora_b(lora, 2)
    lora.eval()
    ids = torch.tensor([ToyTokenizer().encode("hello there")])
    with torch.no_grad():
        expected = lora.generate(ids, adapter_names=["a"], max_new_tokens=8, do_sample=False, eos_token_id=None,
                                 attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    engine = Engine.from_model(lora, ToyTokenizer(), max_len=64, max_batch=2)
    out = engine.generate(["hello there", "a"], ["a", "__base__"], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.close()
    assert out[0].token_ids == expected


def test_quantized_weights_with_a_bitsandbytes_base_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    from lorakit.cli import main

    assert main(["serve", "--quantization", "nf4", "--quantize-weights", "int8", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--quantize-weights quantizes a bf16 base" in err and len(err.splitlines()) == 1
