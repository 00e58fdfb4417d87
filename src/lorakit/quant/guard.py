"""Keep bitsandbytes' 4-bit layers differentiable on the CPU.

bitsandbytes 0.50's `Linear4bit.forward`, on a CPU with AVX-512 BF16, in eval mode and with an input
that needs no gradient (an evaluation pass under `torch.no_grad()`), repacks its weight in place into
a layout for its fused CPU inference kernel (`quant_state.packing_format_for_cpu = True`). From then
on every forward takes `gemv_4bit`, which has no autograd formula: in training the layer returns an
output with no path back to its input, so the gradient through the frozen base is silently dropped
(the only sign is a UserWarning "an autograd kernel was not registered"). The repacking also turns
double-quantized scales into bf16, so it is not exactly reversible.

lorakit therefore switches the repacking off for every 4-bit layer of a model it prepares for
training (`keep_4bit_trainable`), and checks for layers that were repacked before it could
(`find_repacked_4bit`, `ensure_4bit_trainable`)."""

from __future__ import annotations

import warnings

from torch import nn

from lorakit.errors import LorakitError
from lorakit.weights.kinds import is_4bit


def _is_linear4bit(module: nn.Module) -> bool:
    return is_4bit(getattr(module, "weight", None))


def is_repacked(module: nn.Module) -> bool:
    state = getattr(module.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def find_repacked_4bit(model: nn.Module) -> list[str]:
    """Paths of 4-bit layers whose weight bitsandbytes repacked for CPU inference (no gradient through them)."""
    return [name for name, m in model.named_modules() if _is_linear4bit(m) and is_repacked(m)]


def keep_layer_trainable(module: nn.Module) -> bool:
    """Stop one Linear4bit from repacking; undo a repacking already done. Returns True if it had to undo one."""
    # The flag is read on every forward; with it off, bitsandbytes keeps its differentiable path.
    module.support_avx512bf16_for_cpu = False
    if not is_repacked(module):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # only reached with bitsandbytes loaded

    module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, module.weight.quant_state)
    return True


def keep_4bit_trainable(model: nn.Module) -> list[str]:
    """Make every 4-bit layer of `model` differentiable from now on; returns the paths it had to unpack.

    An unpacked layer gets its gradient back, but its block scales went through bf16 when
    bitsandbytes repacked it, so it differs slightly from the checkpoint: a warning says so."""
    restored = [name for name, m in model.named_modules() if _is_linear4bit(m) and keep_layer_trainable(m)]
    if restored:
        warnings.warn(
            f"{len(restored)} 4-bit layers (first: {restored[0]}) were repacked by bitsandbytes for CPU inference before "
            "training was prepared; lorakit unpacked them, but their block scales were rounded to bf16 on the way. "
            "Call prepare_model_for_kbit_training before any evaluation pass to train on the exact checkpoint.",
            stacklevel=2,
        )
    return restored


def ensure_4bit_trainable(model: nn.Module) -> None:
    """Guard every 4-bit layer, and raise if one already lost its gradient path during training.

    Cheap (one walk over the modules): the training loop calls it before the first step and after each
    evaluation pass."""
    repacked = find_repacked_4bit(model)
    if repacked:
        raise LorakitError(
            f"{len(repacked)} 4-bit layers (first: {repacked[0]}) lost their gradient path: bitsandbytes repacked them for CPU "
            "inference during an evaluation pass; call lorakit.prepare_model_for_kbit_training(model) before training"
        )
    for module in model.modules():
        if _is_linear4bit(module):
            module.support_avx512bf16_for_cpu = False
