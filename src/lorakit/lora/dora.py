"""DoRA's per-module math (Liu et al. 2024, https://arxiv.org/abs/2402.09353), as pure functions.

A DoRA layer computes  W' = m * (W + s B A) / ||W + s B A||  row by row: the direction of the LoRA-updated
weight, rescaled by a trained magnitude m (one per output feature, peft's `lora_magnitude_vector`). Its
output is therefore  m / n * (W x + s B A x) + bias,  with n the row norms of W + s B A. Weights are in
nn.Linear's (out, in) layout here; callers transpose GPT-2's Conv1D.

The norm n is a constant to the gradient (the paper's section 4.3, and peft's DoraLinearLayer, detach it),
so it is computed without autograd. Used by lora/layer.py for training, merging and the direct path;
the generation engine can call the same functions per row (magnitude_scale once per adapter and layer,
then add_dora on its output).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + delta|| of each output row, (out,), in fp32 and outside autograd. `delta` is scaling * B A."""
    return torch.linalg.vector_norm(weight.float() + delta.float(), dim=1)


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / ||W + s B A||, (out,): the factor each output row of W + s B A is multiplied by. Gradients
    reach the magnitude, never the (detached) norm."""
    return magnitude / norm.to(magnitude.dtype)


def initial_magnitude(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The magnitude a new DoRA adapter starts from: the row norms of W + s B A, so that the layer's
    output is unchanged at initialisation (whatever A and B are)."""
    return weight_norm(weight, delta)


def add_dora(result: torch.Tensor, base_out: torch.Tensor, lora_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """result + (scale - 1) * base_out + scale * lora_out, i.e. the base output rescaled per feature plus
    the rescaled adapter output. `base_out` is W x without the bias, `lora_out` is s B A x, `scale` is
    magnitude_scale(...) and broadcasts over the last (feature) dimension."""
    scale = scale.to(lora_out.dtype)
    return result + base_out * (scale - 1) + lora_out * scale


def rescale_output(combined: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """m/n * (W x + s B A x) + bias from `combined` = W x + bias + s B A x (the plain LoRA output): the same
    as add_dora when the base output is not recomputed, in one multiply over the output instead of
    three passes. `scale` (out,) broadcasts over the last dimension."""
    scale = scale.to(combined.dtype)
    out = combined * scale
    return out if bias is None else out + bias.to(out.dtype) * (1 - scale)


@torch.no_grad()
def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """The merged weight m / n * (W + delta), in fp32. `norm` defaults to the row norms of W + delta;
    merging onto weights that already hold other adapters passes the norm of the unmerged base instead."""
    norm = weight_norm(weight, delta) if norm is None else norm
    return magnitude_scale(magnitude.float(), norm)[:, None] * (weight.float() + delta.float())
