"""Score a model on instruction records by greedy generation and exact match (the shipped task's metric)."""

from __future__ import annotations

from typing import Sequence

import torch

from lorakit.data.task import DEFAULT_MAX_NEW_TOKENS, exact_match_rate
from lorakit.data.templates import PromptTemplate, instruction_prompt


@torch.no_grad()
def generate_answers(model, tokenizer, records: Sequence[dict], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     batch_size: int = 16, template: str | PromptTemplate = "auto") -> list[str]:
    """Greedy completions of alpaca-style records (instruction, input), left-padded in batches."""
    prompts = [instruction_prompt(tokenizer, r["instruction"], r.get("input", ""), template) for r in records]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
    try:
        answers = []
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, batch["input_ids"].shape[1] :]  # (B, new tokens)
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def evaluate_exact_match(model, tokenizer, records: Sequence[dict], **kwargs) -> tuple[float, list[str]]:
    """(exact-match rate, predictions) of `model` on records with an "output" reference."""
    predictions = generate_answers(model, tokenizer, records, **kwargs)
    return exact_match_rate(predictions, [r["output"] for r in records]), predictions
