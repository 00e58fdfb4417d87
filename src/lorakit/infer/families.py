"""What the generation engine must know of a model family to compute its layers as transformers does.

One `Layout` per model (read from its config by its family's entry in FAMILIES) says everything the
decoder (infer/decoder.py) does differently between families: the names of the projections it fuses, the
norm arithmetic and where each norm sits, the multipliers, q/k norms, the attention's scale, softcapping,
sinks and sliding windows, which rotary tables each layer reads, and whether the MLP is gated (run as
fused projections) or run as transformers' module (MoE blocks). A family without an entry is refused in
one line: run through another family's arithmetic it would answer wrong tokens without a warning.
Each family here is checked against transformers on tiny random models (tests/infer/test_families.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from lorakit.errors import LorakitError

SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Layout:
    """One model's layers as the decoder computes them. Norm slot names are attributes of a decoder layer
    (None: the family has no norm there)."""

    family: str
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # attention's input projections, q | k | v side by side
    gate_up: tuple[str, ...] | None = ("gate_proj", "up_proj")  # gated MLP's, gate | up; None: the MLP runs as its module
    activation: str = "act_fn"  # the gated MLP's activation attribute
    # norm arithmetic: "llama" w * normed(x).to(dtype); "fp32" (w * normed(x)) in fp32 (OLMo2, gpt-oss);
    # "gemma" ((1 + w) * normed(x)) in fp32
    norm: str = "llama"
    pre_attention: str | None = "input_layernorm"
    post_attention: str | None = None  # on the attention's output, before the residual add
    pre_mlp: str | None = "post_attention_layernorm"
    post_mlp: str | None = None  # on the MLP's output, before the residual add
    qk_norm: str | None = None  # "head": q_norm / k_norm per head (Qwen3, Gemma 3); "projection": over q / k whole (OLMo2)
    attention_scale: float = 1.0
    residual_multiplier: float = 1.0  # Granite
    embedding_multiplier: float = 1.0  # Granite (Gemma's scale is inside its embedding module)
    logit_divisor: float = 1.0  # Granite's logits_scaling
    attention_softcap: float | None = None  # Gemma 2: tanh-capped scores
    final_softcap: float | None = None  # Gemma 2 / 3: tanh-capped logits
    sinks: bool = False  # gpt-oss: a learned logit per head in each softmax, dropped after it
    windows: tuple[int | None, ...] = ()  # per layer: the sliding window (positions seen, itself included) or None
    rope_types: tuple[str, ...] | None = None  # per layer, the rotary table it reads (Gemma 3: two bases); None: one table
    half_rotary: bool = False  # the rotary module returns D/2 frequencies (gpt-oss), applied to the two halves
    mlp_returns_tuple: bool = False  # gpt-oss's MLP returns (hidden, router scores)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _windows(config) -> tuple[int | None, ...]:
    """Each layer's sliding window: by config.layer_types where the family has them, else the one window
    (Mistral, Mixtral, Phi-3: every layer, None when unset)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return tuple(window if kind == SLIDING else None for kind in types)
    return (window,) * config.num_hidden_layers


def _llama(config, **fields) -> Layout:
    fields.setdefault("attention_scale", _head_dim(config) ** -0.5)
    return Layout(family=config.model_type, windows=_windows(config), **fields)


def _gemma(config, **fields) -> Layout:
    return _llama(config, norm="gemma", post_attention="post_attention_layernorm", pre_mlp="pre_feedforward_layernorm",
                  post_mlp="post_feedforward_layernorm", attention_scale=config.query_pre_attn_scalar**-0.5,
                  final_softcap=config.final_logit_softcapping, **fields)


def _granite(config) -> Layout:
    return _llama(config, attention_scale=config.attention_multiplier, residual_multiplier=config.residual_multiplier,
                  embedding_multiplier=config.embedding_multiplier, logit_divisor=config.logits_scaling)


FAMILIES: dict[str, Callable[..., Layout]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "qwen3": lambda c: _llama(c, qk_norm="head"),
    "mixtral": lambda c: _llama(c, gate_up=None),
    "qwen3_moe": lambda c: _llama(c, qk_norm="head", gate_up=None),
    "phi3": lambda c: _llama(c, qkv=("qkv_proj",), gate_up=("gate_up_proj",), activation="activation_fn"),
    "olmo2": lambda c: _llama(c, norm="fp32", pre_attention=None, post_attention="post_attention_layernorm", pre_mlp=None,
                              post_mlp="post_feedforward_layernorm", qk_norm="projection"),
    "granite": _granite,
    "gemma2": lambda c: _gemma(c, attention_softcap=c.attn_logit_softcapping),
    "gemma3_text": lambda c: _gemma(c, qk_norm="head", attention_softcap=c.attn_logit_softcapping, rope_types=tuple(c.layer_types)),
    "gpt_oss": lambda c: _llama(c, norm="fp32", gate_up=None, sinks=True, half_rotary=True, mlp_returns_tuple=True),
}


def layout_of(model: nn.Module) -> Layout:
    """The model's Layout, or a one-line refusal naming its family."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise LorakitError(f"the generation engine does not run the {family!r} family (it runs {', '.join(FAMILIES)}); "
                           "use transformers' generate for this model")
    if getattr(config, "use_bidirectional_attention", False):
        raise LorakitError(f"this {family} model attends bidirectionally; the generation engine runs causal decoders only")
    return FAMILIES[family](config)
