"""estimate/profile.py: saved-tensor bytes counted on the meta device are those of a real run."""

from __future__ import annotations

import torch

from lorakit.config import LoraConfig
from lorakit.estimate.profile import decoder_layers, measure_decoder, meta_model
from lorakit.lora.targets import find_targets


def test_meta_measured_activations_match_a_real_run(tiny_llama):
    """The saved-tensor bytes counted on meta tensors are the bytes a real bf16 run keeps."""

    def measure(model, device):
        targets = [model.get_submodule(p) for p in find_targets(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))]
        return measure_decoder(model, 2, 16, targets, 4, device=device)

    on_meta = measure(meta_model(tiny_llama.config), "meta")
    on_cpu = measure(tiny_llama.to(torch.bfloat16).requires_grad_(False), "cpu")
    assert on_meta == on_cpu and on_meta[0][0] > 0


def test_meta_model_has_no_storage_and_finds_its_layers(tiny_llama):
    model = meta_model(tiny_llama.config)
    assert all(p.is_meta and not p.requires_grad for p in model.parameters())
    assert len(decoder_layers(model)) == tiny_llama.config.num_hidden_layers
