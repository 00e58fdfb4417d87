"""An adapter trained by lorakit on a quantized base is a peft adapter for that same quantized base."""

from __future__ import annotations

import pytest
import torch

from lorakit.quant.load import bnb_config
from lorakit.quant.config import QuantConfig
from tests.quant.qhelpers import batch, save_tiny_llama, train_quantized_adapter

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_peft_loads_a_lorakit_adapter_on_the_same_quantized_base(tmp_path, quantization):
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_llama(tmp_path / "base")
    model = train_quantized_adapter(base_dir, quantization, "all-linear", steps=2)
    model.save_pretrained(tmp_path / "adapter")
    ids = batch(7)["input_ids"]
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()

    theirs_base = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=bnb_config(QuantConfig(quantization)),
                                                       dtype=torch.bfloat16, device_map={"": "cpu"})
    theirs = peft.PeftModel.from_pretrained(theirs_base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        reference = theirs(input_ids=ids).logits.float()
        with theirs.disable_adapter():
            bare = theirs(input_ids=ids).logits.float()
    assert (reference - bare).abs().max() > 0.05  # the adapter does something
    torch.testing.assert_close(ours, reference, atol=0.05, rtol=0.02)
