"""The engine on a quantized base (infer/packed.py's _Quantized over kernels/quant_matmul.py): each row's
adapters on top of int8 / 4-bit base weights, against the same adapters on the dequantized weights."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.infer.decoder import SlotDecoder
from lorakit.infer.engine import Engine
from lorakit.infer.packed import QUANTIZERS
from lorakit.infer.sampling import SamplingParams
from lorakit.kernels import quant_matmul
from lorakit.lora.layer import LoraLinear
from tests.helpers import ToyTokenizer, tiny_lora_model

IDS = torch.randint(2, 128, (3, 6), generator=torch.Generator().manual_seed(0))
ROWS = ["a", "__base__", {"b": 0.7, "c": 0.3}]


def dequantized_copy(lora, quantization: str):
    """The model with every linear's base weight replaced by what its quantized form stands for."""
    clone = copy.deepcopy(lora)
    with torch.no_grad():
        for name, module in clone.model.named_modules():
            base = module.base_layer if isinstance(module, LoraLinear) else module
            if type(base) is torch.nn.Linear and "lora_" not in name:  # the base's linears, not the adapters' A and B
                base.weight.copy_(quant_matmul.dequantize(QUANTIZERS[quantization](base.weight.contiguous())))
    return clone


def step_logits(decoder: SlotDecoder, routing) -> tuple[torch.Tensor, torch.Tensor]:
    cache = decoder.allocate(3, 32)
    first = decoder.prefill(cache, 0, IDS, torch.full((3,), 6), routing)
    return first.float(), decoder.decode(cache, torch.tensor([3, 4, 5]), torch.full((3,), 6), routing).float()


@pytest.mark.parametrize("compile", [False, True])  # True: the routed C++ kernel adds the adapters
@pytest.mark.parametrize("quantization", sorted(QUANTIZERS))
def test_adapters_on_a_quantized_base_equal_them_on_its_dequantized_weights(quantization: str, compile: bool) -> None:
    lora = tiny_lora_model(dtype=torch.bfloat16)
    quantized = SlotDecoder(lora.model, compile=compile, quantization=quantization)
    oracle = dequantized_copy(lora, quantization)
    expected = step_logits(SlotDecoder(oracle.model, pack=False), oracle.routing(ROWS))
    dense = step_logits(SlotDecoder(lora.model, pack=False), lora.routing(ROWS))
    for mine, theirs, unquantized in zip(step_logits(quantized, lora.routing(ROWS)), expected, dense):
        scale = float(theirs.abs().max())
        # only the kernel's int8 rounding of the activations differs from the oracle
        torch.testing.assert_close(mine, theirs, atol=0.03 * scale, rtol=0.02)
        assert (mine - unquantized).abs().max() > 0  # the base really is the quantized one


@pytest.mark.parametrize("quantization", sorted(QUANTIZERS))
def test_a_quantized_batch_invariant_engine_gives_each_row_its_tokens_alone(quantization: str) -> None:
    engine = Engine.from_model(tiny_lora_model(dtype=torch.bfloat16), ToyTokenizer(), max_len=64, max_batch=4,
                               deterministic=True, quantization=quantization)
    prompts, params = ["hello there", "a", "the quick brown fox"], SamplingParams(max_tokens=8, ignore_eos=True)
    together = [h.result().token_ids for h in [engine.submit(p, r, params) for p, r in zip(prompts, ROWS)]]
    alone = [engine.generate([p], [r], params)[0].token_ids for p, r in zip(prompts, ROWS)]
    engine.close()
    assert together == alone


def test_an_unknown_quantization_is_refused_in_one_line() -> None:
    with pytest.raises(LorakitError, match="unknown engine quantization 'int4'; use one of int8, q4_0"):
        SlotDecoder(tiny_lora_model(dtype=torch.bfloat16).model, quantization="int4")
