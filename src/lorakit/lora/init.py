"""peft's `init_lora_weights` methods: how a new adapter's A and B start.

  True            A Kaiming-uniform (a = sqrt 5), B zero: the adapter starts as a no-op (LoRA's paper)
  False           A and B both keep nn.Linear's random init: not a no-op (for tests and research)
  "gaussian"      A ~ N(0, 1/r), B zero
  "pissa"         A, B the top r singular triplets of W (split as sqrt(S) on each side, divided by the
                  scaling); W keeps the residual W - s B A, so the layer's output is unchanged
  "pissa_niter_N" the same from torch.svd_lowrank with N subspace iterations (fast, randomised: seeded)
  "olora"         A, B from W's QR decomposition (B = Q[:, :r], A = R[:r]); W keeps the residual
  "loftq"         W replaced by its 4-bit NF4 (or 8-bit) quantization, A, B the rank-r SVD of what that
                  loses, alternated loftq_iter times (LoftQ): the base then quantizes without that error.
                  On a base already in NF4, W is read from the base's checkpoint and A, B start from
                  W - dequantize(Q) (one iteration; peft's replace_lora_weights_loftq)
  "eva"           B zero, A nn.Linear's default until lora/eva.py's data pass sets it from the top right-singular
                  vectors of the layer's inputs (and redistributes the ranks); W untouched

Each is one small function in METHODS (no string `elif` chain); each computes in fp32 and reproduces
peft 0.21's numbers for the same seed, so peft and lorakit start from the same adapter (LoftQ: peft's
algorithm, whose own code needs a GPU; tests check it against peft's parts). PiSSA, OLoRA and
LoftQ change the base weight: such an adapter only means something on that changed base, which is why
peft_format.py can convert it back to an adapter of the original base (peft's
path_initial_model_for_weight_conversion).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.base_layer import is_conv1d, layer_shape
from lorakit.weights.kinds import is_4bit, is_quantized

if TYPE_CHECKING:  # layer.py imports this module late (inside add_adapter): the type only
    from lorakit.lora.layer import LoraLinear

MUTATES_BASE = ("pissa", "olora", "loftq")
"""Methods that change the base weight (a prefix: pissa_niter_N included)."""


def mutates_base(init: bool | str) -> bool:
    return isinstance(init, str) and init.startswith(MUTATES_BASE)


def init_problem(base_layer: nn.Module, init: bool | str, loftq_config: dict | None = None) -> str | None:
    """Why `init` cannot start an adapter on `base_layer` (None if it can): checked on every target
    before the first layer changes (lora/inject.py), so a refusal never leaves a model half-initialised."""
    if init == "loftq" and is_quantized(base_layer.weight):
        if not is_4bit(base_layer.weight):
            return "init_lora_weights 'loftq' on a quantized base needs it in 4-bit (nf4); load it with quantization nf4 or unquantized"
        if (loftq_config or {}).get("loftq_iter", 1) != 1:
            return ("loftq_iter > 1 re-quantizes the base each iteration, which needs it unquantized; "
                    "use loftq_iter 1 on an nf4 base, or load the base unquantized")
        return None
    if mutates_base(init) and is_quantized(base_layer.weight):
        return (f"init_lora_weights {init!r} rewrites the base weights, which cannot be done on a quantized "
                "base; load the base unquantized for it (and quantize the result afterwards)")
    in_features, out_features = layer_shape(base_layer)
    if init == "olora" and is_conv1d(base_layer) and in_features != out_features:
        # peft's QR is of the weight as stored, (in, out) for Conv1D: non-square, the factors get the wrong shapes
        return (f"init_lora_weights 'olora' cannot start a {in_features} -> {out_features} Conv1D layer (peft's "
                "QR of its (in, out) weight has the wrong shapes); use pissa, or target other layers")
    return None


def initialise(layer: LoraLinear, name: str, init: bool | str, loftq_config: dict, original: torch.Tensor | None = None) -> None:
    """Set adapter `name`'s A and B (and, for PiSSA / OLoRA / LoftQ, the base weight) as `init` says.
    `original`: for LoftQ on an NF4 base, the layer's unquantized weight (lora/loftq.original_weights).

    Raises:
        LorakitError: init_problem's reasons (inject_adapter checks them first).
    """
    if init is False:
        return
    method = "pissa_niter" if isinstance(init, str) and init.startswith("pissa_niter_") else ("true" if init is True else init)
    problem = init_problem(layer.base_layer, init, loftq_config)
    if problem:
        raise LorakitError(problem)
    with torch.no_grad():
        if original is not None:
            _loftq_from_original(layer, name, original)
        else:
            METHODS[method](layer, name, init, loftq_config)
            if mutates_base(init):
                layer.base_rewritten_by = (name, init)  # for good: deleting the adapter does not restore W


def _kaiming(layer: LoraLinear, name: str, init: bool | str, loftq_config: dict) -> None:
    nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[name].weight)


def _gaussian(layer: LoraLinear, name: str, init: bool | str, loftq_config: dict) -> None:
    nn.init.normal_(layer.lora_A[name].weight, std=1 / layer.lora_A[name].weight.shape[0])
    nn.init.zeros_(layer.lora_B[name].weight)


def _eva(layer: LoraLinear, name: str, init: bool | str, loftq_config: dict) -> None:
    nn.init.zeros_(layer.lora_B[name].weight)  # A waits for the data pass (lora/eva.py), as in peft


def _pissa(layer: LoraLinear, name: str, init: bool | str, loftq_config: dict) -> None:
    weight = layer.dense_weight()  # (out, in) fp32
    r, scaling = layer.lora_A[name].weight.shape[0], layer.scaling[name]
    if init == "pissa":
        # W = V S U^T: the r largest singular values and their vectors
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        v, s, uh = v[:, :r], s[:r], uh[:r]
    else:
        v, s, u = torch.svd_lowrank(weight, r, niter=int(init.removeprefix("pissa_niter_")))
        uh = u.t()
    root = torch.sqrt(s / scaling)
    _set_factors(layer, name, root[:, None] * uh, v * root[None, :], weight)


def _olora(layer: LoraLinear, name: str, init: bool | str, loftq_config: dict) -> None:
    # peft's QR is of the weight as stored (Conv1D's (in, out) included), so lorakit's is too
    stored = layer.base_layer.weight.float()
    q, upper = torch.linalg.qr(stored)
    r = layer.lora_A[name].weight.shape[0]
    lora_a, lora_b = upper[:r].contiguous(), q[:, :r].contiguous()
    residual = stored - layer.scaling[name] * lora_b @ lora_a
    layer.lora_A[name].weight.data = lora_a.to(layer.lora_A[name].weight.dtype)
    layer.lora_B[name].weight.data = lora_b.to(layer.lora_B[name].weight.dtype)
    layer.base_layer.weight.data = residual.to(layer.base_layer.weight.dtype)


def _loftq(layer: LoraLinear, name: str, init: bool | str, loftq_config: dict) -> None:
    from lorakit.lora.loftq import loftq_factors

    stored = layer.base_layer.weight
    quantized, lora_a, lora_b = loftq_factors(stored.float(), layer.lora_A[name].weight.shape[0],
                                              loftq_config.get("loftq_bits", 4), loftq_config.get("loftq_iter", 1))
    layer.lora_A[name].weight.data = lora_a.to(layer.lora_A[name].weight.dtype)
    layer.lora_B[name].weight.data = lora_b.to(layer.lora_B[name].weight.dtype)
    stored.data = quantized.to(stored.dtype)


def _loftq_from_original(layer: LoraLinear, name: str, original: torch.Tensor) -> None:
    """A, B from what the NF4 base loses against its original weight; the base stays as it is."""
    from lorakit.lora.loftq import low_rank

    lora_b, lora_a = low_rank(original.float() - layer.dense_weight(), layer.lora_A[name].weight.shape[0])
    layer.lora_A[name].weight.data = lora_a.to(layer.lora_A[name].weight.dtype)
    layer.lora_B[name].weight.data = lora_b.to(layer.lora_B[name].weight.dtype)


def _set_factors(layer: LoraLinear, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: torch.Tensor) -> None:
    """A, B as given and the base weight (`weight`, (out, in) fp32) minus scaling * B A, in its own layout and dtype."""
    residual = weight - layer.scaling[name] * lora_b @ lora_a
    layer.lora_A[name].weight.data = lora_a.contiguous().to(layer.lora_A[name].weight.dtype)
    layer.lora_B[name].weight.data = lora_b.contiguous().to(layer.lora_B[name].weight.dtype)
    base = layer.base_layer.weight
    base.data = (residual.T if layer.fan_in_fan_out else residual).contiguous().to(base.dtype)


METHODS: dict[str, Callable[[LoraLinear, str, bool | str, dict], None]] = {
    "true": _kaiming, "gaussian": _gaussian, "pissa": _pissa, "pissa_niter": _pissa, "olora": _olora,
    "loftq": _loftq, "eva": _eva,
}
