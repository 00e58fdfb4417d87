"""Write a tiny Llama as a GGUF file, the way llama.cpp's converter lays one out (no downloads).

Tensor names come from the `gguf` package's own HF -> GGUF name map, q / k rows are permuted as
llama.cpp permutes them (transformers undoes it on load), and the vocabulary is a small sentencepiece
one: "<unk>", "<s>", "</s>", every printable character ("▁" for the space) and "▁" + each lowercase
letter, 128 tokens for the tiny Llama's vocab_size of 128."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch

from tests.helpers import make_tiny_llama

SPACE = "\u2581"


def tiny_vocab() -> list[str]:
    chars = [SPACE if c == " " else c for c in string.printable[:95]]  # digits, letters, punctuation, space
    tokens = ["<unk>", "<s>", "</s>"] + chars + [SPACE + c for c in string.ascii_lowercase]
    return tokens + [f"<extra_{i}>" for i in range(128 - len(tokens))]


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q / k row order (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0):
    """Write the tiny Llama of `seed` to `path` as an fp32 GGUF; returns the model it wrote."""
    import gguf

    model = make_tiny_llama(seed)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens = tiny_vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(len(tokens) - 3)])
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    writer.add_token_types([gguf.TokenType.UNKNOWN, control, control] + [normal] * (len(tokens) - 3))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        data = tensor.detach().to(torch.float32).numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            data = _permute(data, heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
