"""estimate(): full fine-tuning vs LoRA vs QLoRA for one model and batch, from the byte formulas, the
meta-device profile and the fitted constants."""

from __future__ import annotations

import os
from typing import Sequence

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.estimate.constants import HEAP_RETENTION, RECOMPUTE_FACTOR
from lorakit.estimate.formulas import checkpoint_bytes_per_param, head_loss_bytes, weights_by_format
from lorakit.estimate.profile import load_config, measure_decoder, meta_model
from lorakit.estimate.report import Column, Estimate
from lorakit.lora.targets import find_targets, output_head_names
from lorakit.quant.prepare import upcast_norms


def estimate(
    model: str | os.PathLike,
    r: int = 16,
    target_modules: Sequence[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
    seq_len: int = 512,
    batch: int = 4,
    adapter_bytes: int = 4,
    lora_checkpointing: bool = False,
    qlora_checkpointing: bool = True,
    allocator: str = "glibc",
) -> Estimate:
    """Full fine-tuning vs LoRA vs QLoRA for `model` ("default", a model directory or a config.json).

    Raises:
        LorakitError: no config.json, target_modules match nothing, or an unknown allocator.
    """
    config = load_config(model)
    stored = checkpoint_bytes_per_param(config)  # before meta_model, which sets config.dtype to bf16
    net = meta_model(config)
    targets = list(target_modules) if not isinstance(target_modules, str) else target_modules
    lora_paths = find_targets(net, LoraConfig(r=r, target_modules=targets))
    lora_modules = [net.get_submodule(p) for p in lora_paths]
    lora_params = sum(r * (m.in_features + m.out_features) for m in lora_modules)
    heads = output_head_names(net)
    quantizable = [m for n, m in net.named_modules() if isinstance(m, nn.Linear) and n not in heads]
    total = sum(p.numel() for p in net.parameters())
    formats = weights_by_format(total, quantizable)
    tokens = batch * seq_len

    per_layer, outside = measure_decoder(net, batch, seq_len, lora_modules, r)
    head = head_loss_bytes(tokens, config.hidden_size, config.vocab_size)
    hidden_state = tokens * config.hidden_size * 2

    if allocator not in HEAP_RETENTION:
        raise LorakitError(f"allocator must be one of {', '.join(HEAP_RETENTION)} (got {allocator!r})")

    def activations(per_layer: list[int], outside: int, checkpointing: bool) -> int:
        if checkpointing:  # each layer keeps its input; one layer at a time is recomputed in backward
            live = len(per_layer) * hidden_state + RECOMPUTE_FACTOR * max(per_layer) + outside + head
        else:
            live = sum(per_layer) + outside + head
        return int(live * HEAP_RETENTION[allocator])

    lora_act = activations(per_layer, outside, lora_checkpointing)
    upcast_norms(net)  # QLoRA runs its norms in fp32
    q_layer, q_outside = measure_decoder(net, batch, seq_len, lora_modules, r)
    qlora_act = activations(q_layer, q_outside, qlora_checkpointing)
    net.requires_grad_(True)
    full_layer, full_outside = measure_decoder(net, batch, seq_len, [], r)
    full_act = activations(full_layer, full_outside, False) + 2 * total  # + autocast's bf16 weight copies

    adapter_file = lora_params * adapter_bytes
    moments = 2 * adapter_file  # AdamW keeps two moments in the adapters' dtype

    def loading(bytes_per_param: int | None, built: int) -> int:
        # the same dtype is used in place from the memory map, paged in during training (and counted
        # there); anything else is built beside the file's pages, which are all read
        return 0 if bytes_per_param == stored else stored * total + built

    columns = {
        "full": Column("full fine-tuning", total, 4 * total, 4 * total, 8 * total, full_act, False, formats["bf16"],
                       loading(4, 4 * total)),
        "lora": Column("LoRA (bf16 base)", lora_params, formats["bf16"] + adapter_file, adapter_file, moments,
                       lora_act, lora_checkpointing, adapter_file, loading(2, formats["bf16"])),
        "qlora": Column("QLoRA (nf4 base)", lora_params, formats["nf4+dq"] + adapter_file, adapter_file, moments,
                        qlora_act, qlora_checkpointing, adapter_file, loading(None, formats["nf4+dq"])),
    }
    notes = [
        "full: fp32 weights + fp32 gradients + AdamW moments (16 bytes per parameter), bf16 autocast; saved file = the model in bf16",
        f"LoRA / QLoRA: adapters in {'fp32' if adapter_bytes == 4 else 'bf16'} with AdamW moments; saved file = adapter_model.safetensors",
        "activations: measured on the meta device from the model's own code (lorakit's packed attention, lean kernels, "
        f"chunked head loss), times {HEAP_RETENTION[allocator]} for what the {allocator} allocator keeps resident",
    ]
    return Estimate(str(model), type(net).__name__, total, sum(m.weight.numel() for m in quantizable), lora_params, r,
                    targets, tokens, formats, columns, notes)
