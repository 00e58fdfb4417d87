"""What llama.cpp calls a transformers model's parts: its GGUF architecture, tensor names and layouts.

llama.cpp's own converter (convert_hf_to_gguf.py) is the contract followed here: module paths are mapped
through gguf-py's TensorNameMap, and for the Llama family the rows of q_proj / k_proj are permuted
from transformers' half-split rotary layout to GGUF's interleaved one (LlamaModel.permute). An adapter
must go through the same permutation on lora_B's rows, or it would rotate the wrong pairs."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from lorakit.errors import LorakitError
from lorakit.models.load import resolve_model_dir


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    permute_qk: bool  # LlamaModel's undo_permute: q / k rows reordered for GGUF's rotary layout


# model_type -> what convert_hf_to_gguf.py makes of it (MistralForCausalLM is a LlamaModel there too)
FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    "qwen3": Family(gguf.MODEL_ARCH.QWEN3, permute_qk=False),
}


@dataclass(frozen=True)
class BaseModel:
    """The base model's config.json, as much of it as naming and laying out tensors needs."""

    directory: Path
    config: dict[str, Any]
    family: Family

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.family.arch]

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def gguf_name(self, module_path: str) -> str | None:
        """`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q.weight` (None: llama.cpp has no such tensor).
        A tied lm_head has none either: the GGUF holds only token_embd."""
        if module_path.rpartition(".")[2] == "lm_head" and self.tied_embeddings:
            return None
        names = gguf.get_tensor_name_map(self.family.arch, int(self.config["num_hidden_layers"]))
        name = names.get_name(module_path)
        return None if name is None else f"{name}.weight"

    def to_gguf_rows(self, module_path: str, rows: torch.Tensor) -> torch.Tensor:
        """A q_proj / k_proj output-side tensor (weight, bias, or lora_B) in GGUF's row order."""
        if not self.family.permute_qk:
            return rows
        leaf = module_path.rpartition(".")[2]
        heads = int(self.config["num_attention_heads"])
        if leaf == "q_proj":
            return permute_rows(rows, heads)
        if leaf == "k_proj":
            return permute_rows(rows, int(self.config.get("num_key_value_heads") or heads))
        return rows


def permute_rows(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: within each head, rows (x0..x_{d/2-1}, y0..) -> (x0, y0, x1, y1, ...)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def unpermute_rows(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of permute_rows (what transformers' GGUF loader does): for tests and readers."""
    return (weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def read_base(name_or_dir: str | os.PathLike) -> BaseModel:
    """The base model ("default" or a local directory) as far as GGUF naming needs: its config.json only.

    Raises:
        LorakitError: no such model, or a family llama.cpp's names are not mapped for here.
    """
    directory = resolve_model_dir(name_or_dir)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise LorakitError(f"{directory / 'config.json'} cannot be read as JSON ({err}); point --base at a model directory") from None
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise LorakitError(f"GGUF export knows the {', '.join(sorted(FAMILIES))} families, not {model_type!r}; "
                           "convert this model with llama.cpp's own tools")
    return BaseModel(directory, config, family)
