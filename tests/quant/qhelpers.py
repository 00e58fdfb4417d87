"""Tiny quantized models for the quant tests: saved once per module from a config, loaded through
bitsandbytes like any real checkpoint (no downloads, a second or two each)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*kernels.*")


def save_tiny_llama(directory: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer Llama (hidden 64, intermediate 128) in bf16 safetensors, with a usable config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    values.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**values)).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def batch(seed: int = 0, rows: int = 2, length: int = 24, vocab: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def adapter_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n}


def train_quantized_adapter(base_dir: Path, quantization: str, target_modules, steps: int, seed: int = 0):
    """A LoraModel on `base_dir` loaded quantized, with random B and `steps` AdamW steps taken."""
    from lorakit import LoraConfig, get_peft_model, load_model, prepare_model_for_kbit_training

    torch.manual_seed(seed)
    model = get_peft_model(prepare_model_for_kbit_training(load_model(base_dir, quantization=quantization)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=target_modules))
    with torch.no_grad():
        for name, param in adapter_params(model).items():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps):
        model(**batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model
