"""DoRA adapters in per-row batches (lora/layer.py's banks and dora_gains, infer/packed.py): a DoRA row
equals peft's DoRA forward, beside plain-LoRA, "__base__" and mixed rows, in the module path, the packed
bf16 path (banks and the C++ kernel) and through the engine."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from lorakit.infer.decoder import SlotDecoder
from lorakit.infer.engine import Engine
from lorakit.infer.sampling import SamplingParams
from tests.helpers import ToyTokenizer, make_tiny_llama, randomize_lora_b

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
IDS = torch.randint(2, 128, (4, 9), generator=torch.Generator().manual_seed(3))
ROWS = ["dora", "plain", "__base__", {"dora": 0.5, "plain": 0.5}]


def dora_and_plain(dtype: torch.dtype = torch.float32):
    """(peft model with the DoRA adapter, lorakit model with it and a plain adapter), trained-looking:
    non-zero B and magnitudes off their initial norms."""
    base = make_tiny_llama()
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config), adapter_name="dora")
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config), "dora")
    ours.add_adapter("plain", lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora_b(ours, 1)
    with torch.no_grad():
        state = {n: p for n, p in ours.named_parameters()}
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                key = name.replace("base_model.model.", "model.", 1)
                if "lora_magnitude_vector" in name:
                    key = key.removesuffix(".weight")  # a ParameterDict entry here, a module's weight in peft
                    state[key].mul_(1 + 0.2 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(len(name))))
                param.copy_(state[key])
    return theirs.eval().to(dtype), ours.eval().to(dtype)


def logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, **kwargs).logits


def test_a_dora_row_beside_plain_base_and_mixed_rows_equals_each_alone() -> None:
    theirs, ours = dora_and_plain()
    together = logits(ours, adapter_names=ROWS)
    dora = logits(theirs)  # peft's DoRA forward is the oracle for the DoRA row
    ours.set_adapter("plain")
    plain = logits(ours)
    with ours.disable_adapter():
        base = logits(ours)
    torch.testing.assert_close(together[0], dora[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], plain[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[2], base[2], atol=1e-5, rtol=1e-5)
    assert (dora[0] - plain[0]).abs().max() > 1e-2 and (dora[0] - base[0]).abs().max() > 1e-2


def test_a_mix_with_a_dora_adapter_is_the_weighted_sum_of_each_adapters_change_in_one_layer() -> None:
    _, ours = dora_and_plain()
    layer = ours.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 5, layer.in_features)
    with torch.no_grad():
        base = layer.base_layer(x)
        alone = {}
        for name in ("dora", "plain"):
            ours.set_adapter(name)
            alone[name] = layer(x)
        mixed = layer.add_lora(layer.base_layer(x), x, ours.routing([{"dora": 0.5, "plain": 0.5}] * 4))
    torch.testing.assert_close(mixed, base + 0.5 * (alone["dora"] - base) + 0.5 * (alone["plain"] - base), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("native", [False, True])
def test_packed_bf16_decoding_of_dora_rows_gives_the_module_paths_logits(native: bool) -> None:
    _, ours = dora_and_plain(torch.bfloat16)
    plain, packed = SlotDecoder(ours.model, pack=False), SlotDecoder(ours.model, compile=native)
    routing = ours.routing(ROWS)
    caches = [d.allocate(4, 32) for d in (plain, packed)]
    first = [d.prefill(c, 0, IDS, torch.full((4,), 9), routing) for d, c in zip((plain, packed), caches)]
    step = [d.decode(c, torch.tensor([3, 4, 5, 6]), torch.full((4,), 9), routing) for d, c in zip((plain, packed), caches)]
    for mine, theirs in (first, step):
        torch.testing.assert_close(theirs.float(), mine.float(), atol=0.05 * float(mine.abs().max()), rtol=0.02)


def test_engine_serves_dora_rows_in_a_mixed_batch_as_alone() -> None:
    theirs, ours = dora_and_plain()
    engine = Engine.from_model(ours, ToyTokenizer(), max_len=64, max_batch=4)
    prompts = ["hello there", "a", "the quick brown fox", "lorem"]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    together = engine.generate(prompts, ROWS, params)
    alone = [engine.generate([p], [r], params)[0] for p, r in zip(prompts, ROWS)]
    engine.close()
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    ids = torch.tensor([ToyTokenizer().encode(prompts[0])])
    with torch.no_grad():
        expected = theirs.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, ids.shape[1]:]
    assert together[0].token_ids == expected.tolist()  # the DoRA row's tokens are peft's
