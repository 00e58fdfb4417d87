"""Score adapters (and the base) on held-out records by greedy generation and exact match.

Every record of every adapter goes through one engine run, so the base and N adapters are scored in
the same continuous batches rather than one model after another."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lorakit.data.formats import Sample
from lorakit.data.templates import PromptTemplate, get_template
from lorakit.data.tokenize import EvalPrompt, eval_prompt
from lorakit.errors import LorakitError
from lorakit.infer.engine import Engine
from lorakit.infer.decoder import decoder_parts
from lorakit.infer.sampling import SamplingParams
from lorakit.lora.model import LoraModel
from lorakit.lora.routing import RowSpec


@dataclass(frozen=True)
class Score:
    label: str
    exact_match: float
    predictions: list[dict[str, Any]]  # per record: where, reference, prediction, correct


def exact_match(prediction: str, reference: str) -> bool:
    """True when the two are equal once leading and trailing whitespace is stripped."""
    return prediction.strip() == reference.strip()


def score_samples(model: nn.Module, tokenizer: Any, samples: Sequence[Sample], adapters: Mapping[str, RowSpec],
                  template: str | PromptTemplate = "auto", max_new_tokens: int = 128, max_batch: int = 32) -> list[Score]:
    """Exact match of each labelled adapter spec ({"base": "__base__", "mine": "mine", ...}) on `samples`."""
    if not samples:
        raise LorakitError("no records to evaluate; check the data file")
    template = get_template(template, tokenizer)
    prompts = [eval_prompt(s, tokenizer, template) for s in samples]
    labels = list(adapters)
    rows = [(label, p) for label in labels for p in prompts]
    answers = generate_answers(model, tokenizer, [p.prompt_ids for _, p in rows], [adapters[label] for label, _ in rows],
                               max_new_tokens, max_batch)
    scores = []
    for label in labels:
        mine = [(p, a) for (l, p), a in zip(rows, answers) if l == label]
        predictions = [_prediction(p, a) for p, a in mine]
        rate = sum(x["correct"] for x in predictions) / len(predictions)
        scores.append(Score(label, rate, predictions))
    return scores


def _prediction(prompt: EvalPrompt, answer: str) -> dict[str, Any]:
    return {"where": prompt.where, "reference": prompt.reference, "prediction": answer.strip(),
            "correct": exact_match(answer, prompt.reference)}


def generate_answers(model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], adapters: Sequence[RowSpec],
                     max_new_tokens: int = 128, max_batch: int = 32) -> list[str]:
    """Greedy answers, each row with its own adapter: through lorakit's engine for the families it runs
    (infer/families.FAMILIES), through transformers' generate (with per-row adapters) for others."""
    was_training = model.training
    try:
        if _engine_can_run(model):
            return _engine_answers(model, tokenizer, prompts, adapters, max_new_tokens, max_batch)
        return _transformers_answers(model, tokenizer, prompts, adapters, max_new_tokens, max_batch)
    finally:
        model.train(was_training)


def _engine_can_run(model: nn.Module) -> bool:
    try:
        decoder_parts(model.model if isinstance(model, LoraModel) else model)
        return True
    except LorakitError:
        return False


def _engine_answers(model, tokenizer, prompts, adapters, max_new_tokens, max_batch) -> list[str]:
    longest = max(len(p) for p in prompts) + max_new_tokens + 1
    engine = Engine.from_model(model, tokenizer, max_batch=min(max_batch, len(prompts)), max_len=longest)
    try:
        params = SamplingParams(max_tokens=max_new_tokens)
        handles = [engine.submit(p, a, params) for p, a in zip(prompts, adapters)]
        return [h.result().text for h in handles]
    finally:
        engine.close()


@torch.inference_mode()
def _transformers_answers(model, tokenizer, prompts, adapters, max_new_tokens, max_batch) -> list[str]:
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), max_batch):
        chunk, specs = prompts[start : start + max_batch], list(adapters[start : start + max_batch])
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk])  # left-padded: generation appends on the right
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        extra = {"adapter_names": specs} if isinstance(model, LoraModel) else {}
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **extra)
        answers += [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, width:].tolist()]
    return answers
