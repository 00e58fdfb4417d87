"""Render a conversation with the tokenizer's chat template, split into prompt and reply pieces.

Each assistant reply is found by rendering the conversation up to it twice: once with the
generation prompt (what the model sees at inference, ending e.g. in "<|im_start|>assistant\\n") and
once including the reply. The difference is the reply plus the template's end-of-turn marker
("...<|im_end|>"); the whitespace the template puts after that marker is not learned, and after the
last reply it is dropped so the sequence ends with the end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lorakit.data.formats import Message
from lorakit.errors import LorakitError


@dataclass(frozen=True)
class Segment:
    text: str
    learned: bool
    """True for assistant replies (loss is computed on them), False for everything else."""


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`."""
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    return tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_segments(tokenizer, messages: Sequence[Message], where: str = "") -> list[Segment]:
    """Prompt and reply segments whose texts concatenate to the rendered conversation.

    Raises:
        LorakitError: the template renders a conversation's start differently depending on what
            follows (some templates rewrite earlier turns), so replies cannot be located.
    """
    full = render(tokenizer, messages)
    segments: list[Segment] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = render(tokenizer, messages[:index], add_generation_prompt=True)
        through = render(tokenizer, messages[: index + 1])
        if not (through.startswith(before) and full.startswith(through) and len(before) >= cursor):
            raise LorakitError(
                f"{where}: the chat template renders earlier turns differently once later turns are added, "
                "so assistant replies cannot be masked; use template=alpaca or a template without that behaviour"
            )
        reply_end = len(before) + len(through[len(before):].rstrip())
        segments += [Segment(full[cursor : len(before)], False), Segment(full[len(before) : reply_end], True)]
        cursor = reply_end
    tail = full[cursor:]
    if tail.strip():
        segments.append(Segment(tail, False))
    return [s for s in segments if s.text]
