"""Which attention implementation a model loads with: SDPA where its class supports it, eager where not.

Forcing "sdpa" made transformers refuse every class without it: Gemma 2 and gpt-oss (their logit
softcapping and attention sinks live in their own eager functions) and DeBERTa-v2 (which has no
attention interface at all). The class is looked up from the config, as the Auto class would, without
building the model."""

from __future__ import annotations

from typing import Any

SDPA = "sdpa"
EAGER = "eager"


def model_class(config: Any, auto_class: Any) -> type | None:
    """The class `auto_class.from_pretrained` would build for `config`, or None if it maps to none."""
    from transformers.models.auto.auto_factory import _get_model_class

    try:
        return _get_model_class(config, auto_class._model_mapping)
    except (KeyError, ValueError):
        return None


def supports_sdpa(config: Any, auto_class: Any) -> bool:
    cls = model_class(config, auto_class)
    return bool(cls is not None and getattr(cls, "_supports_sdpa", False))


def supports_attention_interface(config: Any, auto_class: Any) -> bool:
    """True when the class calls attention through transformers' AttentionInterface (so a registered
    function such as training's packed attention or train/attention's dropout SDPA reaches it)."""
    cls = model_class(config, auto_class)
    return bool(cls is not None and getattr(cls, "_supports_attention_backend", False))


def choose_attn_implementation(config: Any, auto_class: Any) -> str:
    """"sdpa" when the model class supports it, else "eager" (transformers' own eager path, the one
    that applies the family's softcapping, sinks or relative positions)."""
    return SDPA if supports_sdpa(config, auto_class) else EAGER
