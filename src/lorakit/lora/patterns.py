"""peft's rank_pattern / alpha_pattern: per-layer ranks and alphas by regex on the module path."""

from __future__ import annotations

import re

from lorakit.config import LoraConfig


def pattern_key(patterns: list[str], path: str) -> str | None:
    """The first pattern that matches the end of `path` at a dot boundary (peft's get_pattern_key:
    re.match(rf"(.*\\.)?({key})$", path)), or None."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", path)), None)


def layer_rank_alpha(config: LoraConfig, path: str) -> tuple[int, float]:
    """(r, lora_alpha) of the layer at `path` (its path in the transformers model, as peft matches it)."""
    r_key = pattern_key(list(config.rank_pattern), path)
    alpha_key = pattern_key(list(config.alpha_pattern), path)
    r = config.rank_pattern[r_key] if r_key is not None else config.r
    alpha = config.alpha_pattern[alpha_key] if alpha_key is not None else config.lora_alpha
    return r, alpha
