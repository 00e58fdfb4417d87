"""An adapter trained by lorakit on a quantized base is a peft adapter for that same quantized base."""

from __future__ import annotations

import pytest
import torch

from lorakit import LoraConfig, get_peft_model, load_model, prepare_model_for_kbit_training
from lorakit.quant.load import bnb_config
from lorakit.quant.config import QuantConfig
from tests.quant.qhelpers import adapter_params, batch, save_tiny_llama

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_peft_loads_a_lorakit_adapter_on_the_same_quantized_base(tmp_path, quantization):
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_llama(tmp_path / "base")
    torch.manual_seed(0)
    model = get_peft_model(prepare_model_for_kbit_training(load_model(base_dir, quantization=quantization)),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in adapter_params(model).items():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(2):
        model(**batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
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
