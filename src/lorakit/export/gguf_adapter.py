"""A peft-format LoRA adapter as llama.cpp's LoRA adapter GGUF (`llama-server --lora a.gguf`, Ollama's ADAPTER).

The contract (llama.cpp's convert_lora_to_gguf.py and src/llama-adapter.cpp): general.type = "adapter",
adapter.type = "lora", general.architecture = the base's, one float adapter.lora.alpha for the whole
file, and for each adapted weight `<base tensor name>.lora_a` (r, in) and `.lora_b` (out, r) in torch's
layout. llama.cpp adds scale * B (A x) with scale = alpha / r, r read from each lora_b.

peft's scale per module is alpha_m / r_m, or alpha_m / sqrt(r_m) with rsLoRA, alpha_m and r_m from
alpha_pattern / rank_pattern. llama.cpp's converter writes lora_alpha alone and so loses rsLoRA and
the patterns; here each module's B is multiplied by its own scale over llama.cpp's, so the product
llama.cpp computes is exactly peft's. Without rsLoRA or patterns that factor is 1 and B is untouched."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.export.families import BaseModel, read_base
from lorakit.export.writing import add_tensor, atomic_gguf, tensor_type
from lorakit.lora.peft_format import read_adapter_config, read_adapter_weights, split_factors

ADAPTER_TYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class GgufLora:
    """One adapted weight as it goes into the file."""

    name: str  # the base's GGUF tensor name, e.g. blk.0.attn_q.weight
    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r), peft's scale over llama.cpp's folded in, rows in GGUF order
    folded: float  # the factor B was multiplied by (1.0: none)


@dataclass
class AdapterExport:
    path: Path
    arch: str
    alpha: float
    tensors: list[GgufLora]

    def lines(self) -> list[str]:
        folded = sum(t.folded != 1.0 for t in self.tensors)
        ranks = sorted({t.lora_a.shape[0] for t in self.tensors})
        out = [f"adapter written to {self.path} (llama.cpp LoRA GGUF, {self.arch}, {len(self.tensors)} weights, "
               f"rank {'/'.join(map(str, ranks))}, alpha {self.alpha:g})"]
        if folded:
            out.append(f"scales of {folded} weights folded into lora_b (rsLoRA or alpha/rank patterns), so llama.cpp's alpha / r gives peft's result")
        return out


def module_scale(config: LoraConfig, module_path: str, rank: int) -> float:
    """peft's scaling for one module: its alpha (alpha_pattern, peft's get_pattern_key rule) over r or sqrt(r)."""
    alpha = config.lora_alpha
    for pattern, value in config.alpha_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)


def llama_cpp_scale(alpha: float, rank: int) -> float:
    """What llama.cpp multiplies B A by (llama_adapter_lora_weight::get_scale, at adapter scale 1):
    alpha / r, or 1 when the file's alpha is 0."""
    return alpha / rank if alpha else 1.0


def gguf_loras(adapter_dir: str | os.PathLike, base: BaseModel) -> tuple[float, list[GgufLora]]:
    """The file's alpha and its tensors, everything llama.cpp cannot express refused first.

    Raises:
        LorakitError: DoRA, tensors that are no LoRA pair (trained biases, modules_to_save copies,
            embedding LoRA), Conv1D layouts, or a module the base's GGUF has no tensor for.
    """
    config = read_adapter_config(adapter_dir)
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    tensors = read_adapter_weights(adapter_dir)
    factors, others = split_factors(tensors, weights)
    _refuse_inexpressible(config, _unsaved_copies(others, tensors, base), weights)
    if not factors:
        raise LorakitError(f"{weights} holds no LoRA factors; export an adapter that adapts at least one layer")
    unnamed = [p for p in factors if base.gguf_name(p) is None]
    if unnamed:
        why = " (its weight is tied to token_embd, which llama.cpp's LoRA cannot adapt as a head)" if unnamed[0].endswith("lm_head") else ""
        raise LorakitError(f"{unnamed[0]} has no tensor in llama.cpp's {base.arch_name} model{why}; "
                           f"train without it, or merge the adapter instead (lorakit merge --gguf)")
    alpha = float(config.lora_alpha)
    loras = []
    for path, (lora_a, lora_b) in sorted(factors.items(), key=lambda item: _layer_order(item[0])):
        rank = lora_a.shape[0]
        folded = module_scale(config, path, rank) / llama_cpp_scale(alpha, rank)
        b = lora_b.to(torch.float32) * folded if folded != 1.0 else lora_b
        loras.append(GgufLora(base.gguf_name(path), lora_a, base.to_gguf_rows(path, b), folded))
    return alpha, loras


def _refuse_inexpressible(config: LoraConfig, others: list[str], weights: Path) -> None:
    if config.use_dora:
        raise LorakitError("DoRA's per-row magnitudes have no place in llama.cpp's LoRA format; "
                           "merge the adapter instead (lorakit merge --gguf q8_0|bf16)")
    if config.fan_in_fan_out:
        raise LorakitError("the adapter was trained on Conv1D layers (fan_in_fan_out), which llama.cpp's families do not have")
    if others:
        raise LorakitError(f"{weights} holds {len(others)} tensors that are no LoRA pair (e.g. {others[0]}: a trained bias, "
                           "a modules_to_save copy or an embedding LoRA); llama.cpp's adapters take lora_A / lora_B pairs "
                           "only, so merge the adapter instead (lorakit merge --gguf)")


def _unsaved_copies(others: list[str], tensors: dict[str, torch.Tensor], base: BaseModel) -> list[str]:
    """`others` less the embedding-layer copies peft saves beside an lm_head / embed_tokens LoRA
    (save_embedding_layers): llama.cpp's converter skips them too. One whose shape differs from the
    base's vocabulary was resized in training, which the base GGUF cannot follow, so it stays."""
    shape = (int(base.config.get("vocab_size", -1)), int(base.config.get("hidden_size", -1)))
    return [k for k in others if not (k.endswith(".base_layer.weight") and tuple(tensors[k].shape) == shape)]


def _layer_order(path: str) -> tuple:
    """Module paths in the order of the model (layer 2 before layer 10), as llama.cpp's files list them."""
    return tuple(int(part) if part.isdigit() else part for part in path.split("."))


def export_adapter_gguf(adapter_dir: str | os.PathLike, out_path: str | os.PathLike, base: str | os.PathLike = "default",
                        dtype: str = "f32") -> AdapterExport:
    """Write `adapter_dir` (peft format) as a llama.cpp LoRA GGUF at `out_path`, atomically.

    Args:
        adapter_dir: the adapter (adapter_config.json + adapter_model.safetensors).
        out_path: the .gguf file to write.
        base: the base model it was trained on ("default" or a local directory); only its config.json
            is read, to name tensors and lay out q / k rows as llama.cpp's converter does.
        dtype: f32 (default, exact), f16 or bf16 for the factors.

    Raises:
        LorakitError: anything llama.cpp's format cannot express, or an unknown base family.
    """
    kind = tensor_type(dtype, ADAPTER_TYPES)
    family = read_base(base)
    alpha, loras = gguf_loras(adapter_dir, family)
    with atomic_gguf(out_path, family.arch_name) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(adapter_dir).resolve().name)
        for lora in loras:
            add_tensor(writer, f"{lora.name}.lora_a", lora.lora_a, kind)
            add_tensor(writer, f"{lora.name}.lora_b", lora.lora_b, kind)
    return AdapterExport(Path(out_path), family.arch_name, alpha, loras)
