"""Tiny models built from configs (no downloads), shared by every test directory.

Import as `from tests.helpers import ...` (pytest puts the repository root on sys.path)."""

from __future__ import annotations

import torch


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def make_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def make_tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def randomize_lora_b(model, seed: int = 1) -> None:
    """Give every lora_B non-zero values, so adapters actually change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


class ToyTokenizer:
    """Printable characters <-> ids for tiny models (vocab 128): id = 2 + (ord(c) - 32) % 96, id 1 is EOS."""

    eos_token_id = 1
    pad_token_id = 0
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [2 + (ord(c) - 32) % 96 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + (int(i) - 2) % 96) for i in ids if int(i) > 1)


def tiny_lora_model(seed: int = 0, dtype=torch.float32):
    """A tiny Llama with three adapters of different ranks and target sets, all with non-zero B."""
    from lorakit import LoraConfig, get_peft_model

    model = make_tiny_llama(seed).to(dtype)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), "a")
    lora.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "v_proj"]))
    lora.add_adapter("c", LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "down_proj", "q_proj"]))
    randomize_lora_b(lora, seed + 1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.mul_(3)  # adapters that change greedy tokens, not just logits
    return lora.eval()


def write_peft_adapter(directory, seed: int, **config) -> None:
    """A peft-made adapter on the tiny Llama, with random non-zero A and B, saved to `directory`."""
    import peft

    model = peft.get_peft_model(make_tiny_llama(), peft.LoraConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(str(directory))


def char_tokenizer():
    """One id per printable character (<pad> 0, </s> 1, <unk> 2), `</s>` as EOS, no chat template (alpaca
    prompts): a tokenizer to save beside a tiny model for CLI runs."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
