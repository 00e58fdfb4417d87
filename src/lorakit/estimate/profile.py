"""The model on PyTorch's meta device, and the bytes autograd keeps for backward in one forward.

A meta model has every shape and no storage, so any transformers architecture is profiled from its
config.json in about a second, through its own code and lorakit's training paths."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, masking_utils

from lorakit.errors import LorakitError
from lorakit.models.load import resolve_model_dir
from lorakit.train.attention import SEQ_LENS_KWARG
from lorakit.train.step import training_paths


def load_config(model: str | os.PathLike):
    """config.json of "default", a model directory, or a config.json path."""
    path = Path(model)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    directory = path if (path / "config.json").is_file() else resolve_model_dir(model)
    return AutoConfig.from_pretrained(str(directory), local_files_only=True)


def meta_model(config) -> nn.Module:
    """The architecture of `config` in bf16 on the meta device, frozen."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.requires_grad_(False)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise LorakitError(f"{type(model).__name__} has no list of decoder layers; lorakit estimate handles decoder-only LMs")
    return max(lists, key=len)


class SavedTensorMeter:
    """Bytes autograd keeps for backward, per decoder layer (None: outside the layers), each storage
    counted once; parameters are not activations and are left out."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.by_layer: dict[int | None, int] = {}
        self.seen: set[int] = set()
        self.alive: list[torch.Tensor] = []
        self.current: int | None = None
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, i=index: setattr(self, "current", i)))
            self.handles.append(layer.register_forward_hook(lambda m, a, o: setattr(self, "current", None)))

    def add(self, tensor: torch.Tensor, nbytes: int | None = None, key: int | None = None) -> None:
        base = tensor._base if tensor._base is not None else tensor
        if isinstance(base, nn.Parameter):
            return
        key = key if key is not None else id(base)
        if key in self.seen:
            return
        self.seen.add(key)
        self.alive.append(base)  # keeps ids unique: a freed tensor's id could be reused by a new one
        size = nbytes if nbytes is not None else base.numel() * base.element_size()
        self.by_layer[self.current] = self.by_layer.get(self.current, 0) + size

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure_decoder(model: nn.Module, batch: int, seq_len: int, lora_targets: Sequence[nn.Module], r: int,
                    device: str = "meta") -> tuple[list[int], int]:
    """(saved bytes per decoder layer, saved bytes outside them) for one forward of the decoder
    (on meta tensors; a real device gives the same numbers, slowly, which the tests check).

    LoRA layers are stood in for by hooks on the targeted linears: each keeps its input (for lora_A's
    gradient) and its rank-r intermediate (for lora_B's), which is what LoraLinear keeps in bf16 autocast."""
    layers = decoder_layers(model)
    meter = SavedTensorMeter(layers)

    def lora_saves(module: nn.Module, args: tuple) -> None:
        x = args[0]
        meter.add(x)
        meter.add(x, x[..., :1].numel() * r * 2, key=id(module))

    for module in lora_targets:
        meter.handles.append(module.register_forward_pre_hook(lora_saves))
    embeddings = model.get_input_embeddings()
    meter.handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    positions = torch.arange(seq_len, device=device).expand(batch, -1)
    decoder = getattr(model, model.base_model_prefix)
    # lorakit's training paths (its causal attention kernel per packed example, lean norm / MLP
    # kernels), as its training step runs them
    packed = {SEQ_LENS_KWARG: [[seq_len]] * batch}
    try:
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t), training_paths(model), _meta_shims(device):
            decoder(input_ids=ids, position_ids=positions, use_cache=False, **packed)
    finally:
        meter.close()
    per_layer = [meter.by_layer.get(i, 0) for i in range(len(layers))]
    return per_layer, meter.by_layer.get(None, 0)


class _FlashOnMeta(torch.autograd.Function):
    """What the CPU flash kernel keeps for backward (q, k, v, output, fp32 logsumexp), on meta tensors;
    left alone, SDPA on meta takes its math path and keeps fp32 attention matrices instead."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: meta measurements stop at the forward
        raise NotImplementedError


@contextmanager
def _meta_shims(device: str) -> Iterator[None]:
    """On meta tensors, stand in for the two steps of a real forward that need values:
      - SDPA keeps what the CPU flash kernel keeps (`_FlashOnMeta`), not its math path's fp32 matrices;
      - transformers' mask preparation looks for packed sequences in position_ids (a data-dependent
        check, since lorakit registers a mask function for its packed attention); every profiled row is
        one example, for which that check finds none, so None is its answer here too."""
    if device != "meta":
        yield
        return
    original_sdpa = torch.nn.functional.scaled_dot_product_attention
    original_find = masking_utils.find_packed_sequence_indices
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: _FlashOnMeta.apply(q, k, v)
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original_sdpa
        masking_utils.find_packed_sequence_indices = original_find
