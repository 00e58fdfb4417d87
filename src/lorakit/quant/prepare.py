"""`prepare_model_for_kbit_training`: peft's name and call, lorakit's choices about precision.

What it does to a (usually quantized) transformers model, before or after adapters are added:
  1. freezes every base parameter (adapter weights, if already there, stay trainable);
  2. keeps normalization layers in fp32: their weights are upcast and they compute in fp32, but each
     hands its output back in the dtype it received. peft instead upcasts every unquantized parameter
     (embeddings, output head) to fp32, which turns the whole residual stream, attention included,
     into fp32; on a CPU that costs ~2-8x in matmul speed and 2x in activation memory for no gain
     in the norms' accuracy;
  3. keeps bitsandbytes' 4-bit layers differentiable after evaluation passes (see guard.py);
  4. enables input gradients and activation (gradient) checkpointing, so activation memory is one
     layer's worth plus one hidden state per layer instead of every layer's intermediates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.lora.model import unwrap_model
from lorakit.quant.guard import keep_4bit_trainable

ADAPTER_PARTS = (".lora_A.", ".lora_B.", ".modules_to_save.", ".lora_embedding_A.", ".lora_embedding_B.")
FP32_NORM_HOOK = "_lorakit_fp32_norm_hook"
"""Attribute holding a norm layer's fp32 hook handle (requantize.py removes the hooks again)."""


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    checkpoint_every_n_layers: int = 1,
    **_: Any,
) -> nn.Module:
    """Ready a quantized base for LoRA training, in place; returns `model` (peft's signature).

    Args:
        model: a transformers model, or a lorakit LoraModel wrapping one.
        use_gradient_checkpointing: recompute each decoder layer in backward instead of keeping its
            activations (slower by about one forward pass, much smaller).
        gradient_checkpointing_kwargs: passed to torch.utils.checkpoint; default {"use_reentrant": False}.
        checkpoint_every_n_layers: checkpoint only every n-th decoder layer (lorakit's addition): the
            others keep their activations, trading memory back for speed (n=2 recomputes half the layers).
    """
    for name, param in model.named_parameters():
        if not any(part in f".{name}" for part in ADAPTER_PARTS):
            param.requires_grad_(False)
    upcast_norms(model)
    keep_4bit_trainable(model)
    if use_gradient_checkpointing:
        enable_checkpointing(unwrap_model(model), gradient_checkpointing_kwargs, checkpoint_every_n_layers)
    return model


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm / GroupNorm and transformers' per-model copies (LlamaRMSNorm, ...)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__
    return name.endswith(("Norm", "RMSNorm", "LayerNorm")) and not any(True for _ in module.children())


def upcast_norms(model: nn.Module) -> int:
    """fp32 weights and math for every norm layer, output returned in the input's dtype; returns how many."""
    count = 0
    for module in model.modules():
        if not is_norm(module):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
        if getattr(module, FP32_NORM_HOOK, None) is None:
            setattr(module, FP32_NORM_HOOK, module.register_forward_hook(_output_in_input_dtype))
        count += 1
    return count


def _output_in_input_dtype(module: nn.Module, args: tuple, output: Any) -> Any:
    # An fp32 weight times a bf16 input gives fp32; without this the residual stream after the
    # first norm, and every layer after it, would silently run in fp32.
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor) and output.dtype != args[0].dtype:
        return output.to(args[0].dtype)
    return output


def enable_checkpointing(model: nn.Module, kwargs: dict[str, Any] | None = None, every_n_layers: int = 1) -> None:
    """Activation checkpointing per decoder layer, with input gradients on so adapters in the first
    layer still get a gradient under reentrant checkpointing."""
    kwargs = {"use_reentrant": False} if kwargs is None else dict(kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    elif hasattr(model, "gradient_checkpointing_enable") and every_n_layers == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"{type(model).__name__} has no (per-n-layers) gradient checkpointing; pass use_gradient_checkpointing=False "
                        "or checkpoint_every_n_layers=1")
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing

