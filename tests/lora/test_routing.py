"""Mixed-adapter batches: each row its own adapter, a mix, or the base, in one forward pass."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import LorakitError
from tests.helpers import make_tiny_llama, randomize_lora_b, tiny_lora_model


def alone(model, ids, adapter):
    with torch.no_grad():
        if adapter == "__base__":
            with model.disable_adapter():
                return model(input_ids=ids).logits
        model.set_adapter(adapter)
        return model(input_ids=ids).logits


def test_each_row_gets_the_logits_it_gets_alone() -> None:
    model = tiny_lora_model()
    ids = torch.randint(2, 128, (5, 9), generator=torch.Generator().manual_seed(0))
    rows = ["a", "b", "__base__", "c", "a"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=rows).logits
    for i, adapter in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone(model, ids[i : i + 1], adapter)[0], atol=1e-5, rtol=1e-5)
    # and the adapters really differ from each other and from the base
    assert not torch.allclose(mixed[0], alone(model, ids[:1], "b")[0], atol=1e-3)
    assert not torch.allclose(mixed[0], alone(model, ids[:1], "__base__")[0], atol=1e-3)


def test_a_mix_row_equals_summed_scaled_adapters() -> None:
    model = tiny_lora_model()
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=[{"a": 1.0, "b": 1.0}, {"a": 0.5, "c": -0.25}]).logits
        model.set_adapter(["a", "b"])  # peft's sum of active adapters
        both = model(input_ids=ids[:1]).logits
        # a 0.5 a - 0.25 c mix, built by hand: scale the copies' B factors
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                for name, weight in (("a", 0.5), ("c", -0.25)):
                    if name in layer.lora_B:
                        layer.lora_B[name].weight.mul_(weight)
        model.set_adapter(["a", "c"])
        by_hand = model(input_ids=ids[1:]).logits
    torch.testing.assert_close(mixed[0], both[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], by_hand[0], atol=1e-5, rtol=1e-5)


def test_matches_peft_mixed_batch(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    base = make_tiny_llama()
    ref = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), "sql")
    ref.add_adapter("json", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["o_proj", "up_proj"]))
    randomize_lora_b(ref, 3)
    ref.save_pretrained(tmp_path)  # "sql" at the top is not default-named: peft writes both in sub-directories
    from lorakit import PeftModel

    mine = PeftModel.from_pretrained(base, tmp_path / "sql", adapter_name="sql")
    mine.load_adapter(tmp_path / "json", "json")
    ref.eval(), mine.eval()
    ids = torch.randint(2, 128, (4, 6), generator=torch.Generator().manual_seed(2))
    rows = ["json", "__base__", "sql", "json"]
    with torch.no_grad():
        expected = ref(input_ids=ids, adapter_names=rows).logits
        got = mine(input_ids=ids, adapter_names=rows).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_generate_with_adapter_names_matches_rows_alone() -> None:
    model = tiny_lora_model()
    ids = torch.randint(2, 128, (3, 5), generator=torch.Generator().manual_seed(4))
    rows = ["c", "a", "__base__"]
    with torch.no_grad():
        together = model.generate(input_ids=ids, adapter_names=rows, max_new_tokens=6, do_sample=False)
        for i, adapter in enumerate(rows):
            if adapter == "__base__":
                with model.disable_adapter():
                    single = model.model.generate(input_ids=ids[i : i + 1], max_new_tokens=6, do_sample=False)
            else:
                model.set_adapter(adapter)
                single = model.model.generate(input_ids=ids[i : i + 1], max_new_tokens=6, do_sample=False)
            assert together[i].tolist() == single[0].tolist()


def test_bad_routing_is_refused_with_one_line() -> None:
    model = tiny_lora_model()
    ids = torch.randint(2, 128, (2, 4))
    with pytest.raises(LorakitError, match=r"no adapter named 'zz'; loaded adapters: a, b, c"):
        model(input_ids=ids, adapter_names=["a", "zz"])
    with pytest.raises(LorakitError, match="2 rows but the batch has 3"):
        model(input_ids=torch.randint(2, 128, (3, 4)), adapter_names=["a", "b"])
    model.train()
    with pytest.raises(LorakitError, match="model.eval"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.eval()
    model.merge_adapter()
    with pytest.raises(LorakitError, match="unmerge_adapter"):
        model(input_ids=ids, adapter_names=["a", "b"])
    with pytest.raises(LorakitError, match="unmerge_adapter"):  # base rows would silently see merged weights
        model(input_ids=ids, adapter_names=["__base__", "__base__"])


def test_routing_sees_adapters_trained_after_the_bank_was_built() -> None:
    model = tiny_lora_model()
    ids = torch.randint(2, 128, (1, 4))
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=["a"]).logits
        for layer in model.modules():
            if hasattr(layer, "lora_B") and "a" in layer.lora_B:
                layer.lora_B["a"].weight.add_(0.5)  # an optimizer step updates in place
        after = model(input_ids=ids, adapter_names=["a"]).logits
        model.set_adapter("a")
        torch.testing.assert_close(after, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("weight", [1e38, float("inf"), float("nan"), -1e9, 101.0])
def test_mix_weights_must_be_finite_and_bounded(weight: float) -> None:
    from lorakit.lora.routing import MAX_MIX_WEIGHT, row_mix

    with pytest.raises(LorakitError, match=f"adapter 'b' has mix weight .*between -{MAX_MIX_WEIGHT:g} and {MAX_MIX_WEIGHT:g}"):
        row_mix({"a": 0.5, "b": weight})
    assert row_mix({"a": -0.5, "b": MAX_MIX_WEIGHT}) == {"a": -0.5, "b": MAX_MIX_WEIGHT}  # negatives subtract, as in peft
