"""Batched, left-padded greedy generation gives what one-at-a-time generation gives."""

import torch

from lorakit.data.task import make_records
from lorakit.data.task_eval import evaluate_exact_match, generate_answers


def test_batched_generation_matches_one_at_a_time(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    records = [dict(r, input=r["input"] + " Extra words here." * i) for i, r in enumerate(make_records(3, seed=0))]  # unequal lengths
    batched = generate_answers(model, tokenizer, records, max_new_tokens=6, batch_size=3)
    single = [generate_answers(model, tokenizer, [r], max_new_tokens=6)[0] for r in records]
    assert batched == single and tokenizer.padding_side == "right"
    rate, predictions = evaluate_exact_match(model, tokenizer, records, max_new_tokens=6)
    assert rate == 0.0 and predictions == batched
