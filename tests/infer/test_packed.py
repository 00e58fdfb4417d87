"""Fused, prepacked projections against the modules they stand for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.infer.decoder import SlotDecoder
from lorakit.infer.packed import FusedLinear, can_pack
from lorakit.kernels import routed_lora
from lorakit.lora.routing import Routing
from tests.helpers import tiny_lora_model


def outputs(fused: FusedLinear, x: torch.Tensor, routing: Routing | None = None) -> list[torch.Tensor]:
    """Each layer's output from the fused call under `routing`."""
    sizes = [getattr(m, "base_layer", m).out_features for m in fused.modules()]
    return list(fused.resolve(routing, x.dtype)(x, routing).split(sizes, dim=-1))


needs_packing = pytest.mark.skipif(not can_pack([nn.Linear(4, 4, dtype=torch.bfloat16)]),
                                   reason="this CPU / torch has no oneDNN bf16 (packing is off there by design)")


def _close_in_bf16(mine: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(mine.float(), reference.float(), atol=0.05 * float(reference.abs().max()), rtol=0.02)


@needs_packing
@pytest.mark.parametrize("by_kernel", [False, True], ids=["banks", "kernel"])
def test_fused_projections_give_each_module_output_with_routed_adapters(by_kernel: bool) -> None:
    model = tiny_lora_model(dtype=torch.bfloat16)
    attn = model.model.model.layers[0].self_attn
    fused = FusedLinear(attn, ["q_proj", "k_proj", "v_proj"], kernel=routed_lora.load() if by_kernel else None)
    modules = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    routing = model.routing(["a", "__base__", {"a": 0.5, "c": 1.0}])
    with torch.inference_mode():
        for mine, module in zip(outputs(fused, x, routing), modules):
            _close_in_bf16(mine, module.add_lora(module.base_layer(x), x, routing))
    if by_kernel:  # the kernel adds the adapters onto the base matmul: no second copy of the base weights
        assert fused._routed.weight is fused._plain.weight


@needs_packing
def test_packed_weights_follow_in_place_changes_and_biases() -> None:
    parent = nn.ModuleDict({"a": nn.Linear(16, 8, dtype=torch.bfloat16), "b": nn.Linear(16, 4, bias=False, dtype=torch.bfloat16)})
    layers, fused = list(parent.values()), FusedLinear(parent, ["a", "b"])
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        before = outputs(fused, x)
        with torch.no_grad():
            layers[0].weight.mul_(-1)  # what a merge does: the same tensor, changed in place
        after = outputs(fused, x)
        for mine, layer in zip(after, layers):
            _close_in_bf16(mine, layer(x))
    assert not torch.allclose(before[0], after[0])


def test_fp32_layers_run_as_the_modules_exactly() -> None:
    parent = nn.ModuleDict({"a": nn.Linear(16, 8), "b": nn.Linear(16, 4)})
    layers, fused = list(parent.values()), FusedLinear(parent, ["a", "b"])
    x = torch.randn(2, 16)
    for mine, layer in zip(outputs(fused, x), layers):
        assert torch.equal(mine, layer(x))


@needs_packing
def test_packed_decoder_gives_the_unpacked_logits_in_bf16() -> None:
    model = tiny_lora_model(dtype=torch.bfloat16)
    packed, plain = SlotDecoder(model.model), SlotDecoder(model.model, pack=False)
    ids = torch.randint(2, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    lengths, nxt = torch.tensor([6, 4, 5]), torch.tensor([9, 10, 11])
    results = []
    routing = model.routing(["a", "__base__", {"b": 0.7, "c": 0.3}])
    for decoder in (packed, plain):
        cache = decoder.allocate(3, 16)
        results.append((decoder.prefill(cache, 0, ids, lengths, routing), decoder.decode(cache, nxt, lengths, routing)))
    for mine, reference in zip(*results):
        _close_in_bf16(mine, reference)


@needs_packing
def test_an_adapter_loaded_after_the_decoder_is_built_is_applied() -> None:
    from lorakit import LoraConfig, get_peft_model
    from tests.helpers import make_tiny_llama, randomize_lora_b

    base = make_tiny_llama().to(torch.bfloat16)
    decoder = SlotDecoder(base)  # q_proj is still a plain nn.Linear here
    ids, lengths = torch.randint(2, 128, (1, 5), generator=torch.Generator().manual_seed(0)), torch.tensor([5])
    before = decoder.prefill(decoder.allocate(1, 8), 0, ids, lengths, None)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    randomize_lora_b(lora)
    after = decoder.prefill(decoder.allocate(1, 8), 0, ids, lengths, None)
    with torch.inference_mode():
        _close_in_bf16(after, lora.model(ids).logits[:, -1])
    assert not torch.allclose(before, after)


@needs_packing
def test_a_long_run_on_one_adapter_switches_to_merged_weights_and_back() -> None:
    from lorakit.infer.packed import MERGE_AFTER

    model = tiny_lora_model(dtype=torch.bfloat16)
    decoder = SlotDecoder(model.model)
    ids, lengths = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(0)), torch.tensor([6, 6])
    nxt = torch.tensor([9, 10])
    qkv = decoder.projections.groups[0]
    routing = model.routing(["a", "a"])
    cache = decoder.allocate(2, 16)
    decoder.prefill(cache, 0, ids, lengths, routing)
    routed_logits = decoder.decode(cache, nxt, lengths, routing)
    assert qkv._merged is None
    for _ in range(MERGE_AFTER):
        merged_logits = decoder.decode(cache, nxt, lengths, routing)
    assert qkv._merged is not None and decoder.projections._resolved[0] is qkv._merged
    _close_in_bf16(merged_logits, routed_logits)
    decoder.decode(cache, nxt, lengths, model.routing(["a", "b"]))  # rows on two adapters: the banks again
    assert decoder.projections._resolved[0] is qkv._routed


@needs_packing
def test_base_weights_packed_at_start_stay_packed_when_adapters_wrap_the_layers() -> None:
    from lorakit import LoraConfig, get_peft_model
    from tests.helpers import make_tiny_llama

    base = make_tiny_llama().to(torch.bfloat16)
    decoder = SlotDecoder(base)
    decoder.projections.warm()
    qkv = decoder.projections.groups[0]
    packed = qkv._plain
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    assert qkv.resolve(lora.routing(["__base__"]), torch.bfloat16) is packed  # not packed again
    with torch.no_grad():
        lora.model.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(2)
    assert qkv.resolve(lora.routing(["__base__"]), torch.bfloat16) is not packed  # the weight changed: packed again
