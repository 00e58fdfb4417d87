"""Samples -> token ids and labels: prompt tokens are -100, replies and the final EOS are learned."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from lorakit.data.chat import Segment, chat_segments
from lorakit.data.formats import Message, Sample
from lorakit.data.templates import PromptTemplate, get_template, user_message
from lorakit.errors import LorakitError

log = logging.getLogger("lorakit.data")

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where no loss is taken. Not shifted: the loop shifts."""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenizeStats:
    examples: int
    truncated: int
    """Examples cut to max_seq_len (their start kept, their EOS lost)."""
    dropped: int
    """Examples whose prompt alone filled max_seq_len, leaving nothing to learn."""

    def __str__(self) -> str:
        return f"{self.examples} examples, {self.truncated} truncated, {self.dropped} dropped (no reply left after truncation)"


def tokenize_samples(
    samples: Sequence[Sample],
    tokenizer,
    max_seq_len: int,
    template: str | PromptTemplate = "auto",
    train_on_inputs: bool = False,
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize every sample, truncate to `max_seq_len`, and drop those with nothing left to learn.

    Raises:
        LorakitError: max_seq_len < 2, a tokenizer without an EOS token, or a template that cannot
            render a sample.
    """
    if max_seq_len < 2:
        raise LorakitError(f"max_seq_len must be at least 2 (got {max_seq_len})")
    template = get_template(template, tokenizer)
    examples, truncated, dropped = [], 0, 0
    for sample in samples:
        example = tokenize_sample(sample, tokenizer, template, train_on_inputs)
        if len(example) > max_seq_len:
            truncated += 1
            example = TokenizedExample(example.input_ids[:max_seq_len], example.labels[:max_seq_len])
        if all(label == IGNORE_INDEX for label in example.labels):
            dropped += 1
            continue
        examples.append(example)
    stats = TokenizeStats(len(examples), truncated, dropped)
    if truncated or dropped:
        log.warning("tokenized %s to max_seq_len=%d; raise max_seq_len to keep them whole", stats, max_seq_len)
    return examples, stats


def tokenize_sample(sample: Sample, tokenizer, template: PromptTemplate, train_on_inputs: bool = False) -> TokenizedExample:
    """One sample -> ids and labels, ending with the tokenizer's EOS (added only if not already there)."""
    eos = eos_token_id(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in sample_segments(sample, tokenizer, template):
        ids = tokenizer.encode(segment.text, add_special_tokens=False)
        input_ids += ids
        labels += ids if segment.learned or train_on_inputs else [IGNORE_INDEX] * len(ids)
    if not input_ids or input_ids[-1] != eos:
        input_ids.append(eos)
        labels.append(eos)
    labels[-1] = eos  # the stop is always learned, whatever train_on_inputs says
    if not template.uses_chat_template or sample.kind == "text":
        input_ids, labels = _with_bos(tokenizer, input_ids, labels)
    return TokenizedExample(input_ids, labels)


def sample_segments(sample: Sample, tokenizer, template: PromptTemplate) -> list[Segment]:
    """The prompt / reply texts of a sample under `template`."""
    if sample.kind == "text":
        return [Segment(sample.text, True)]
    if template.uses_chat_template:
        messages = sample.messages or (Message("user", user_message(sample.instruction, sample.input)), Message("assistant", sample.output))
        return chat_segments(tokenizer, messages, sample.where)
    instruction, input, output, system = _single_turn(sample, template)
    prompt = template.prompt(instruction, input)
    return [Segment(f"{system}\n\n{prompt}" if system else prompt, False), Segment(output, True)]


def _single_turn(sample: Sample, template: PromptTemplate) -> tuple[str, str, str, str]:
    """(instruction, input, output, system) of an instruction sample or a one-exchange conversation."""
    if not sample.messages:
        return sample.instruction, sample.input, sample.output, ""
    roles = [m.role for m in sample.messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise LorakitError(
            f"{sample.where}: template {template.name!r} renders one user/assistant exchange, and this record has turns {roles}; "
            "use template=chatml for multi-turn data"
        )
    system = sample.messages[0].content if roles[0] == "system" else ""
    return sample.messages[-2].content, "", sample.messages[-1].content, system


def eos_token_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise LorakitError("the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) so examples can end with it")
    return int(eos)


def _with_bos(tokenizer, input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Prepend BOS (unlearned) when the tokenizer adds one to plain text; chat templates write their own."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or input_ids[:1] == [bos]:
        return input_ids, labels
    if tokenizer.encode("a", add_special_tokens=True)[:1] != [bos]:
        return input_ids, labels
    return [bos] + input_ids, [IGNORE_INDEX] + labels


@dataclass(frozen=True)
class EvalPrompt:
    where: str
    prompt_ids: list[int]
    """The prompt of the sample's last reply, tokenized exactly as training tokenized it."""
    reference: str
    """That reply's text, without special tokens or surrounding whitespace."""


def eval_prompt(sample: Sample, tokenizer, template: PromptTemplate) -> EvalPrompt:
    """Split a sample into the prompt a model answers and the reference answer (its last reply).

    Raises:
        LorakitError: a text record, which has no reply to compare with.
    """
    if sample.kind == "text":
        raise LorakitError(f"{sample.where}: a text record has no reply to compare with; evaluate instruction or chat records")
    segments = sample_segments(sample, tokenizer, template)
    last = max(i for i, s in enumerate(segments) if s.learned)
    ids = [t for s in segments[:last] for t in tokenizer.encode(s.text, add_special_tokens=False)]
    if not template.uses_chat_template:
        ids, _ = _with_bos(tokenizer, ids, [IGNORE_INDEX] * len(ids))
    reply = tokenizer.encode(segments[last].text, add_special_tokens=False)
    return EvalPrompt(sample.where, ids, tokenizer.decode(reply, skip_special_tokens=True).strip())
