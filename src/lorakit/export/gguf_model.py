"""A dense Llama-family transformers model as a GGUF model llama.cpp loads (`lorakit merge --gguf`).

Written with gguf-py as llama.cpp's convert_hf_to_gguf.py writes a Llama (LlamaModel there): the same
hyper-parameter keys, tensor names, q / k rows permuted into GGUF's rotary layout, norms in F32, the
tokenizer as "gpt2" BPE metadata. The converter itself ships only inside llama.cpp's sources, not in a
package lorakit could depend on, so its Llama path is followed here for the families listed in
LLAMA_TYPES; others are refused in one line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.export.families import FAMILIES, BaseModel
from lorakit.export.vocab import add_tokenizer
from lorakit.export.writing import add_tensor, atomic_gguf, tensor_type

MODEL_TYPES = ("q8_0", "bf16", "f16", "f32")
FILE_TYPES = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}
LLAMA_TYPES = ("llama", "mistral")  # what convert_hf_to_gguf.py writes as arch "llama"


@dataclass
class ModelExport:
    path: Path
    kind: str
    tensors: int
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"merged model written to {self.path} (GGUF {self.kind}, llama, {self.tensors} tensors)"] + self.notes


def llama_base(config: Any, directory: str | os.PathLike) -> BaseModel:
    """The model's config as a BaseModel, refusing what this writer does not express.

    Raises:
        LorakitError: a family other than Llama / Mistral, rotary scaling, sliding windows or biases.
    """
    values = config.to_dict()
    model_type = values.get("model_type")
    if model_type not in LLAMA_TYPES:
        raise LorakitError(f"merge --gguf writes Llama-family models ({', '.join(LLAMA_TYPES)}), not {model_type!r}; "
                           "write a model directory (drop --gguf) and convert it with llama.cpp's convert_hf_to_gguf.py")
    rope = values.get("rope_parameters") or {}
    problems = []
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rotary scaling {rope.get('rope_type')!r}")
    if values.get("sliding_window"):
        problems.append("a sliding window")
    if values.get("attention_bias") or values.get("mlp_bias"):
        problems.append("biases")
    if problems:
        raise LorakitError(f"merge --gguf does not write {' or '.join(problems)} yet; write a model directory (drop --gguf) "
                           "and convert it with llama.cpp's convert_hf_to_gguf.py")
    return BaseModel(Path(directory), values, FAMILIES[model_type])


def add_hyperparameters(writer: gguf.GGUFWriter, values: dict[str, Any], kind: str) -> None:
    """LlamaModel.set_gguf_parameters' keys (convert_hf_to_gguf.py) for a plain Llama."""
    heads = int(values["num_attention_heads"])
    head_dim = int(values.get("head_dim") or values["hidden_size"] // heads)
    writer.add_block_count(int(values["num_hidden_layers"]))
    writer.add_context_length(int(values["max_position_embeddings"]))
    writer.add_embedding_length(int(values["hidden_size"]))
    writer.add_feed_forward_length(int(values["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(values.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(float((values.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(values["rms_norm_eps"]))
    writer.add_file_type(FILE_TYPES[kind])
    writer.add_vocab_size(int(values["vocab_size"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != int(values["hidden_size"]) // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def gguf_tensors(model: nn.Module, base: BaseModel) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in GGUF layout) for every weight; a tied lm_head is token_embd's and is left out.

    Raises:
        LorakitError: a weight llama.cpp's Llama has no tensor for (left over from a wrapper).
    """
    out = []
    for key, tensor in model.state_dict().items():
        path = key.removesuffix(".weight")
        if path.endswith("lm_head") and base.tied_embeddings:
            continue
        name = base.gguf_name(path) if key.endswith(".weight") else None
        if name is None:
            raise LorakitError(f"{key} has no tensor in llama.cpp's llama model; merge every adapter first (lorakit merge)")
        out.append((name, base.to_gguf_rows(path, tensor)))
    return out


def write_model_gguf(model: nn.Module, tokenizer: Any, tokenizer_dir: str | os.PathLike, out_path: str | os.PathLike,
                     kind: str = "q8_0", name: str | None = None) -> ModelExport:
    """Write a dense Llama-family `model` (a merged one) and its tokenizer as a GGUF at `out_path`, atomically.

    Args:
        model: a transformers LlamaForCausalLM (or Mistral without sliding window), no LoRA wrappers.
        tokenizer: its transformers tokenizer; `tokenizer_dir` the directory it was saved in (the merges,
            special ids and chat template are read from its files, as llama.cpp's converter does).
        kind: q8_0 (2-D weights in Q8_0's 32-wide blocks, F16 where rows do not split), bf16, f16 or f32;
            norms are F32 in every case.

    Raises:
        LorakitError: another family, rotary scaling, biases, or a tokenizer that is not byte-level BPE.
    """
    kind_type = tensor_type(kind, MODEL_TYPES)
    base = llama_base(model.config, tokenizer_dir)
    tensors = gguf_tensors(model, base)
    with atomic_gguf(out_path, base.arch_name) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or Path(out_path).stem)
        add_hyperparameters(writer, base.config, kind)
        notes = add_tokenizer(writer, tokenizer, tokenizer_dir, int(base.config["vocab_size"]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gguf_name, tensor in tensors:
            add_tensor(writer, gguf_name, tensor, kind_type if tensor.dim() > 1 else gguf.GGMLQuantizationType.F32)
    return ModelExport(Path(out_path), kind, len(tensors), notes)
