"""quant/mapped.py: a quantized load keeps no view of the checkpoint's memory map."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit.models.load import load_model
from lorakit.quant.config import QuantConfig
from lorakit.quant.load import bnb_config
from lorakit.quant.mapped import inside, own_unquantized_tensors, safetensors_mappings
from tests.quant.qhelpers import save_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def mapped_parameters(model: torch.nn.Module) -> int:
    ranges = safetensors_mappings()
    return sum(inside(p, ranges) for p in model.parameters())


def test_quantized_load_keeps_no_view_of_the_checkpoint_file(model_dir):
    """Unquantized bf16 tensors handed out as views of the mmapped file would keep every page
    quantization read resident (2.1 GB for a 1.1B model); lorakit copies them out."""
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=bnb_config(QuantConfig("nf4")),
                                                 dtype=torch.bfloat16, device_map={"": "cpu"})
    if not mapped_parameters(plain):
        pytest.skip("this transformers version copies tensors on load; nothing to fix")
    assert own_unquantized_tensors(plain) > 0
    assert mapped_parameters(plain) == 0
    assert mapped_parameters(load_model(model_dir, quantization="nf4")) == 0


def test_inside_checks_the_storage_address():
    tensor = torch.zeros(4)
    address = tensor.untyped_storage().data_ptr()
    assert inside(tensor, [(address, address + 16)])
    assert not inside(tensor, [(address + 16, address + 32)])
    assert not inside(torch.zeros(0), [(0, 2**63)])  # empty tensors hold no pages
