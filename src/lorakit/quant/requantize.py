"""Dequantize a model to dense weights, quantize a dense model again (only when asked), and measure
what that costs in logits.

Re-quantizing a merged model rounds W + dW to the 4-bit grid, which moves most of the weights the
adapter changed by up to half a quantization step: the merged model then differs from the model the
adapter was trained as. lorakit's merge therefore writes dense weights by default, and
`requantize_model` reports the logit error it introduces whenever it is used."""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lorakit.quant.config import QuantConfig
from lorakit.quant.detect import is_quantized_layer
from lorakit.quant.load import load_quantized
from lorakit.quant.prepare import FP32_NORM_HOOK
from lorakit.weights.dequant import dense_weight

# The quantization-error probe: a handful of short, varied prompts (chat, code, prose, numbers).
PROBE_PROMPTS = (
    "What is the capital of France?",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "LoRA adapts a frozen model with a low-rank update, so fine-tuning needs",
    "The train left at 9:45 and arrived 2 hours and 20 minutes later, at",
)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every bitsandbytes layer by a dense nn.Linear holding its weights (dequantized in fp32,
    stored in `dtype`), cast all other parameters to `dtype`, and drop the quantization metadata, so
    `save_pretrained` writes a plain checkpoint. In place; returns `model`."""
    for path, module in list(model.named_modules()):
        if is_quantized_layer(module):
            _replace(model, path, dense_linear(module, dtype))
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    strip_quantization(model)
    return model


def dense_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    weight = dense_weight(module)  # fp32, (out, in)
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, dtype=dtype, device=weight.device)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if module.bias is not None:
            dense.bias.copy_(module.bias.float())
    dense.requires_grad_(False)
    return dense


def strip_quantization(model: nn.Module) -> None:
    """Forget that `model` was loaded quantized (transformers' own `remove_quantization_config`, plus
    lorakit's fp32-norm hooks, which would do nothing on a model now in one dtype)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    for module in model.modules():
        hook = getattr(module, FP32_NORM_HOOK, None)
        if hook is not None:
            hook.remove()
            setattr(module, FP32_NORM_HOOK, None)


def requantize_model(model: nn.Module, config: QuantConfig, work_dir: str | os.PathLike | None = None) -> nn.Module:
    """A quantized copy of a dense model, built the way every quantized base is: written to a
    temporary directory and loaded back through `BitsAndBytesConfig`, so transformers knows it as a
    quantized model and `save_pretrained` writes bitsandbytes' serialized format."""
    config.validate()
    if not config.enabled:
        raise ValueError("requantize_model needs a quantization (nf4 | fp4 | int8)")
    with tempfile.TemporaryDirectory(prefix="lorakit-requantize-", dir=work_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        return load_quantized(staging, config)


@dataclass
class LogitError:
    """How far a candidate model's logits are from a reference's, over the probe prompts' tokens."""

    max_abs: float
    mean_abs: float
    tokens: int

    def __str__(self) -> str:
        return f"max |logit diff| {self.max_abs:.4g}, mean {self.mean_abs:.3g} over {self.tokens} tokens"


def probe_inputs(tokenizer, prompts: Sequence[str] = PROBE_PROMPTS, vocab_size: int | None = None) -> list[torch.Tensor]:
    """Token ids (1, T) of each probe prompt; without a tokenizer, fixed pseudo-random ids instead."""
    if tokenizer is not None:
        return [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size or 32000, (1, 32), generator=generator) for _ in prompts]


@torch.no_grad()
def prompt_logits(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 logits of each probe, run one at a time (no padding to blur the comparison)."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # bitsandbytes' int8 inference warns on every call that it computes in fp16
            warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
            return [model(input_ids=ids).logits[0].float() for ids in inputs]
    finally:
        model.train(was_training)


def logit_error(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> LogitError:
    diffs = torch.cat([(r - c).abs().flatten() for r, c in zip(reference, candidate)])
    return LogitError(max_abs=diffs.max().item(), mean_abs=diffs.mean().item(), tokens=sum(r.shape[0] for r in reference))


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, leaf, new)
