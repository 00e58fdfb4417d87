"""A PiSSA / OLoRA adapter converted to a plain LoRA adapter of the original base, as peft converts it.

Those inits move the top of W into the adapter (W = W_res + s B0 A0), so the trained adapter only fits
the residual base W_res. Since W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0], the adapter
with A' = [A ; A0] and B' = [B | -B0] (rank 2r, alpha doubled so the scaling stays) fits the original
base. This is peft's save_pretrained(..., path_initial_model_for_weight_conversion=<initial adapter>),
which reads A0 and B0 from the adapter saved before training; the files match peft's, key for key.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import torch

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError

CONVERTIBLE = ("pissa", "olora")


def to_original_base(config: LoraConfig, tensors: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor],
                     source: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of the trained adapter as a plain LoRA adapter of the original base weights.
    `initial` are the tensors of the adapter as saved right after its initialisation (from `source`).

    Raises:
        LorakitError: the adapter does not change the base (nothing to convert), uses DoRA or rsLoRA with
            patterns (peft refuses those too), or the initial adapter does not have its layers and shapes.
    """
    init = config.init_lora_weights
    if not (isinstance(init, str) and init.startswith(CONVERTIBLE)):
        raise LorakitError(f"path_initial_model_for_weight_conversion converts PiSSA / OLoRA adapters; this one has "
                           f"init_lora_weights={init!r}, so save it without that argument")
    if config.use_dora:
        raise LorakitError("a DoRA adapter cannot be converted to the original base (its magnitude is not a low-rank "
                           "term); save it as it is and use it with the residual base")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise LorakitError("converting an rsLoRA adapter with rank_pattern / alpha_pattern is not supported (nor by peft); drop one of them")
    converted = {}
    for key, value in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            converted[key] = value
            continue
        start = initial.get(key)
        if start is None or start.shape != value.shape:
            got = "is missing" if start is None else f"is {tuple(start.shape)}, not {tuple(value.shape)}"
            raise LorakitError(f"{key} {got} in the initial adapter {source}; pass the adapter saved right after this one was initialised")
        start = start.to(value.dtype)
        converted[key] = torch.cat([value, start], dim=0) if ".lora_A." in key else torch.cat([value, -start], dim=1)
    alpha = config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)
    return dataclasses.replace(
        config, r=2 * config.r, lora_alpha=alpha, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
    ), converted
