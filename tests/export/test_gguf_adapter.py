"""The adapter GGUF read back with gguf-py's reader: llama.cpp's metadata, names and shapes, and the
delta llama.cpp computes from it (alpha / r * B A, rows back in transformers' order) equal to peft's."""

from __future__ import annotations

import json
import math

import gguf
import peft
import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.export.families import unpermute_rows
from lorakit.export.gguf_adapter import export_adapter_gguf, llama_cpp_scale
from tests.helpers import make_tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(directory, model=None, seed: int = 0, save_embedding_layers: bool | str = "auto", **config) -> peft.PeftModel:
    """A peft adapter with random non-zero A and B on `model` (the tiny Llama), saved to `directory`."""
    lora = peft.get_peft_model(model if model is not None else make_tiny_llama(), peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    lora.save_pretrained(str(directory), save_embedding_layers=save_embedding_layers)
    return lora


def save_base(tmp_path, model) -> str:
    model.save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def llama_cpp_deltas(path, config: dict) -> dict[str, torch.Tensor]:
    """What llama.cpp adds to each base weight, in transformers' layout (q / k rows un-permuted)."""
    reader = gguf.GGUFReader(path)
    alpha = field(reader, "adapter.lora.alpha")
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    deltas = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            base = name.removesuffix(".lora_a")
            a, b = tensors[name], tensors[base + ".lora_b"]
            if ".attn_q." in base:
                b = unpermute_rows(b, config["num_attention_heads"])
            elif ".attn_k." in base:
                b = unpermute_rows(b, config["num_key_value_heads"])
            deltas[base] = llama_cpp_scale(alpha, a.shape[0]) * (b @ a)
    return deltas


def peft_deltas(model: peft.PeftModel) -> dict[str, torch.Tensor]:
    """peft's own delta for every adapted weight, keyed by the GGUF name llama.cpp gives that weight."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    deltas = {}
    for path, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            deltas[names.get_name(path) + ".weight"] = module.get_delta_weight("default").float()
    return deltas


def test_rslora_and_the_alpha_and_rank_patterns_are_folded_into_the_deltas_llama_cpp_computes(tmp_path) -> None:
    model = make_tiny_llama()
    lora = peft_adapter(tmp_path / "adapter", model, r=8, lora_alpha=16, use_rslora=True, target_modules=ALL,
                        rank_pattern={"k_proj": 4, "layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 3, "q_proj": 40})
    report = export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=save_base(tmp_path, model))
    ours, theirs = llama_cpp_deltas(tmp_path / "a.gguf", model.config.to_dict()), peft_deltas(lora)
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * len(ALL)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
    assert all(t.folded != 1.0 for t in report.tensors)  # rsLoRA scales every module differently from alpha / r


def test_the_file_has_llama_cpps_metadata_names_and_shapes(tmp_path) -> None:
    model = make_tiny_llama()
    peft_adapter(tmp_path / "adapter", model, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=save_base(tmp_path, model))
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "adapter.lora.alpha") == 8.0
    shapes = {t.name: (list(t.shape), t.tensor_type) for t in reader.tensors}  # ggml order: ne[0] is the row length
    f32 = gguf.GGMLQuantizationType.F32
    assert shapes == {"blk.0.attn_q.weight.lora_a": ([64, 4], f32), "blk.0.attn_q.weight.lora_b": ([4, 64], f32),
                      "blk.1.attn_q.weight.lora_a": ([64, 4], f32), "blk.1.attn_q.weight.lora_b": ([4, 64], f32),
                      "blk.0.ffn_down.weight.lora_a": ([128, 4], f32), "blk.0.ffn_down.weight.lora_b": ([4, 64], f32),
                      "blk.1.ffn_down.weight.lora_a": ([128, 4], f32), "blk.1.ffn_down.weight.lora_b": ([4, 64], f32)}


def test_a_plain_adapter_keeps_its_alpha_and_its_factors_bit_for_bit(tmp_path) -> None:
    model = make_tiny_llama()
    lora = peft_adapter(tmp_path / "adapter", model, r=4, lora_alpha=8, target_modules=["v_proj"])
    report = export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=save_base(tmp_path, model))
    assert [t.folded for t in report.tensors] == [1.0, 1.0]
    tensors = {t.name: t.data for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    layer = lora.base_model.model.model.layers[1].self_attn.v_proj
    assert torch.equal(torch.from_numpy(tensors["blk.1.attn_v.weight.lora_b"].copy()), layer.lora_B["default"].weight.detach())
    assert torch.equal(torch.from_numpy(tensors["blk.1.attn_v.weight.lora_a"].copy()), layer.lora_A["default"].weight.detach())


@pytest.mark.parametrize("dtype, kind", [("f16", gguf.GGMLQuantizationType.F16), ("bf16", gguf.GGMLQuantizationType.BF16)])
def test_half_precision_factors_are_within_their_rounding(tmp_path, dtype, kind) -> None:
    model = make_tiny_llama()
    lora = peft_adapter(tmp_path / "adapter", model, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj"])
    export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=save_base(tmp_path, model), dtype=dtype)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert {t.tensor_type for t in reader.tensors} == {kind}
    if kind == gguf.GGMLQuantizationType.BF16:  # the reader hands bf16 back as raw bytes
        for t in reader.tensors:
            assert list(t.shape)[::-1] == list(gguf.quants.dequantize(t.data, kind).shape)
        return
    ours, theirs = llama_cpp_deltas(tmp_path / "a.gguf", model.config.to_dict()), peft_deltas(lora)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-2, atol=1e-3)


def test_qwen_names_without_the_llama_rotary_permutation(tmp_path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    lora = peft_adapter(tmp_path / "adapter", model, r=4, lora_alpha=8, target_modules=["q_proj"])
    export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=save_base(tmp_path, model))
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert field(reader, "general.architecture") == "qwen2"
    b = torch.from_numpy(next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight.lora_b").data.copy())
    assert torch.equal(b, lora.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.detach())


def refused(tmp_path, base, match: str) -> None:
    target = tmp_path / "a.gguf"
    target.write_bytes(b"the previous file")
    with pytest.raises(LorakitError, match=match) as err:
        export_adapter_gguf(tmp_path / "adapter", target, base=base)
    assert "\n" not in str(err.value)
    assert target.read_bytes() == b"the previous file"  # refused before writing, and atomically
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_dora_is_refused_in_one_line(tmp_path) -> None:
    model = make_tiny_llama()
    peft_adapter(tmp_path / "adapter", model, r=4, use_dora=True, target_modules=["q_proj"])
    refused(tmp_path, save_base(tmp_path, model), "DoRA")


def test_modules_to_save_and_trained_biases_are_refused_in_one_line(tmp_path) -> None:
    model = make_tiny_llama()
    peft_adapter(tmp_path / "adapter", model, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    refused(tmp_path, save_base(tmp_path, model), "no LoRA pair .*lm_head")


def test_a_tied_lm_head_is_refused_in_one_line(tmp_path) -> None:
    model = make_tiny_llama(tie_word_embeddings=True)
    base = save_base(tmp_path, model)
    peft_adapter(tmp_path / "adapter", model, r=4, target_modules=["q_proj", "lm_head"], save_embedding_layers=False)
    refused(tmp_path, base, "lm_head has no tensor in llama.cpp's llama model .*tied")


def test_an_untied_lm_head_is_the_output_tensor(tmp_path) -> None:
    model = make_tiny_llama()
    lora = peft_adapter(tmp_path / "adapter", model, r=4, target_modules=["lm_head"])
    export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=save_base(tmp_path, model))
    ours, theirs = llama_cpp_deltas(tmp_path / "a.gguf", model.config.to_dict()), peft_deltas(lora)
    assert list(ours) == ["output.weight"]
    torch.testing.assert_close(ours["output.weight"], theirs["output.weight"])


def test_a_family_without_gguf_names_here_is_refused_in_one_line(tmp_path) -> None:
    from tests.helpers import make_tiny_gpt2

    model = make_tiny_gpt2()
    peft_adapter(tmp_path / "adapter", model, r=4, target_modules=["c_attn"])
    refused(tmp_path, save_base(tmp_path, model), "not 'gpt2'")


def test_the_target_must_be_a_file_path(tmp_path) -> None:
    model = make_tiny_llama()
    peft_adapter(tmp_path / "adapter", model, r=4, target_modules=["q_proj"])
    (tmp_path / "out").mkdir()
    with pytest.raises(LorakitError, match="is a directory"):
        export_adapter_gguf(tmp_path / "adapter", tmp_path / "out", base=save_base(tmp_path, model))
