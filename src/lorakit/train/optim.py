"""`build_optimizer`: the optimizer named in the config, checked before training starts.

  adamw_torch        torch.optim.AdamW, fp32 moments (8 bytes per trainable parameter)
  adamw_8bit         bitsandbytes AdamW8bit: moments block-quantized to 8 bits (2 bytes per parameter;
                     tensors under 4,096 elements keep fp32 moments, as in bitsandbytes)
  paged_adamw_8bit   the same with its state in CUDA unified memory, paged out to the host when the GPU
  paged_adamw_32bit  runs short; CUDA only, since paging between host and host is meaningless

LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): `loraplus_groups` puts the B matrices (and, as
in peft's create_loraplus_optimizer, every trainable 1-D tensor: biases, DoRA magnitudes) in a group
whose learning rate is `loraplus_lr_ratio` times the rest's. Each group carries that factor as
`lr_scale`, so the schedule (train/loop.py) sets lr * lr_scale and the ratio holds at every step.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from lorakit.errors import ConfigError
from lorakit.quant.bnb import import_bitsandbytes

OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
_BNB_CLASSES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit"}


def optimizer_problems(name: str, device: str | torch.device | None = None) -> list[str]:
    """Why optimizer `name` cannot run on `device` (empty if it can); meant for config validation."""
    if name not in OPTIMIZERS:
        return [f"optim must be one of {' | '.join(OPTIMIZERS)} (got {name!r})"]
    if name == "adamw_torch":
        return []
    try:
        import_bitsandbytes()
    except Exception as err:
        return [f"optim {name} needs bitsandbytes, which failed to import ({err}); use optim adamw_torch or `pip install 'bitsandbytes>=0.50'`"]
    kind = torch.device(device).type if device is not None else "cpu"
    if name.startswith("paged_") and kind != "cuda":
        return [f"optim {name} pages optimizer state between GPU and host memory and needs CUDA; on {kind} use adamw_8bit or adamw_torch"]
    if kind not in ("cpu", "cuda", "xpu"):
        return [f"optim {name} has no bitsandbytes kernels on {kind}; use optim adamw_torch"]
    return []


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    name: str = "adamw_torch",
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    device: str | torch.device | None = None,
) -> torch.optim.Optimizer:
    """The optimizer `name` over `params` (tensors or param groups).

    Raises:
        ConfigError: the name is unknown or the optimizer cannot run on `device` (checked before any state exists).
    """
    params = [dict(p, params=list(p["params"])) if isinstance(p, dict) else p for p in params]
    if device is None:
        device = _first_device(params)
    problems = optimizer_problems(name, device)
    if problems:
        raise ConfigError(problems, "optimizer")
    if not params:
        raise ConfigError(["no trainable parameters were given to the optimizer; did the adapter get added and set trainable?"], "optimizer")
    if name == "adamw_torch":
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    else:
        bnb_class = getattr(import_bitsandbytes().optim, _BNB_CLASSES[name])
        optimizer = bnb_class(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for group in optimizer.param_groups:  # a group's own learning rate factor (LoRA+), applied from the start
        group["lr"] = lr * group.setdefault("lr_scale", 1.0)
    return optimizer


def loraplus_groups(model: torch.nn.Module, loraplus_lr_ratio: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """peft's create_loraplus_optimizer groups for `model`'s trainable parameters: A (and the rest) at
    lr, B and 1-D tensors at lr * loraplus_lr_ratio; biases and norm weights without weight decay.

    Raises:
        ConfigError: the ratio is not a positive number.
    """
    if not loraplus_lr_ratio > 0:
        raise ConfigError([f"loraplus_lr_ratio must be > 0 (got {loraplus_lr_ratio!r}); LoRA+'s paper uses 16"], "optimizer")
    fast, fast_no_decay, rest = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            # peft decays all but biases and LayerNorm weights (transformers' ALL_LAYERNORM_LAYERS)
            (fast_no_decay if "bias" in name or _in_layer_norm(model, name) else fast).append(param)
        else:
            rest.append(param)
    groups = [
        {"params": rest, "lr_scale": 1.0, "weight_decay": weight_decay},
        {"params": fast, "lr_scale": float(loraplus_lr_ratio), "weight_decay": weight_decay},
        {"params": fast_no_decay, "lr_scale": float(loraplus_lr_ratio), "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _in_layer_norm(model: torch.nn.Module, name: str) -> bool:
    owner = name.rpartition(".")[0]
    return isinstance(model.get_submodule(owner) if owner else model, torch.nn.LayerNorm)


def _first_device(params: list) -> torch.device | None:
    for item in params:
        tensors = item["params"] if isinstance(item, dict) else [item]
        for tensor in tensors:
            return tensor.device
    return None
