"""`build_optimizer`: the optimizer named in the config, checked before training starts.

  adamw_torch        torch.optim.AdamW, fp32 moments (8 bytes per trainable parameter)
  adamw_8bit         bitsandbytes AdamW8bit: moments block-quantized to 8 bits (2 bytes per parameter;
                     tensors under 4,096 elements keep fp32 moments, as in bitsandbytes)
  paged_adamw_8bit   the same with its state in CUDA unified memory, paged out to the host when the GPU
  paged_adamw_32bit  runs short; CUDA only, since paging between host and host is meaningless
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
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    bnb_class = getattr(import_bitsandbytes().optim, _BNB_CLASSES[name])
    return bnb_class(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _first_device(params: list) -> torch.device | None:
    for item in params:
        tensors = item["params"] if isinstance(item, dict) else [item]
        for tensor in tensors:
            return tensor.device
    return None
