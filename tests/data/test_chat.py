"""chat_segments: a conversation rendered by the chat template, split into prompt and reply pieces whose
concatenation is the rendering (less the whitespace after the last reply), replies learned."""

from __future__ import annotations

import pytest

from lorakit.data.chat import Segment, chat_segments, render
from lorakit.data.formats import Message
from lorakit.errors import LorakitError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Marks the last turn differently: an earlier turn renders differently once later turns are added.
REWRITING = (
    "{% for m in messages %}{% if loop.last %}[final]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def chat_tokenizer(template: str = CHATML):
    """A transformers tokenizer built in memory (no files), with `template` as its chat template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tokenizer.chat_template = template
    return tokenizer


def chatml(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


SINGLE = (Message("user", "What is 2+2?"), Message("assistant", "4"))
MULTI = (
    Message("system", "Be brief."),
    Message("user", "Hi"),
    Message("assistant", "Hello there."),
    Message("user", "Bye"),
    Message("assistant", "Goodbye."),
)


def test_render_is_the_templates_text():
    tokenizer = chat_tokenizer()
    assert render(tokenizer, SINGLE) == chatml("user", "What is 2+2?") + chatml("assistant", "4")
    assert render(tokenizer, SINGLE[:1], add_generation_prompt=True) == chatml("user", "What is 2+2?") + "<|im_start|>assistant\n"


def test_single_turn_prompt_and_reply():
    tokenizer = chat_tokenizer()
    segments = chat_segments(tokenizer, SINGLE)
    assert segments == [
        Segment(chatml("user", "What is 2+2?") + "<|im_start|>assistant\n", False),
        Segment("4<|im_end|>", True),
    ]


@pytest.mark.parametrize("messages", [SINGLE, MULTI])
def test_segments_concatenate_to_the_rendering_less_trailing_whitespace(messages):
    tokenizer = chat_tokenizer()
    full = render(tokenizer, messages)
    segments = chat_segments(tokenizer, messages)
    assert "".join(s.text for s in segments) == full.rstrip()
    assert full.endswith("<|im_end|>\n")  # the rendering's final newline is what is dropped


def test_every_reply_is_learned_and_nothing_else():
    tokenizer = chat_tokenizer()
    segments = chat_segments(tokenizer, MULTI)
    learned = [s.text for s in segments if s.learned]
    assert learned == [m.content + "<|im_end|>" for m in MULTI if m.role == "assistant"]
    prompt_text = "".join(s.text for s in segments if not s.learned)
    for message in MULTI:
        if message.role != "assistant":
            assert message.content in prompt_text
    # the newline after a middle reply's end-of-turn marker opens the next prompt segment (not learned)
    assert [s.learned for s in segments] == [False, True, False, True]
    assert segments[2].text.startswith("\n<|im_start|>user\nBye")
    assert segments[2].text.endswith("<|im_start|>assistant\n")


def test_turns_after_the_last_reply_are_a_prompt_segment_kept_whole():
    tokenizer = chat_tokenizer()
    messages = SINGLE + (Message("user", "And 3+3?"),)
    segments = chat_segments(tokenizer, messages)
    assert "".join(s.text for s in segments) == render(tokenizer, messages)  # nothing dropped: the tail is text
    assert segments[-1] == Segment("\n" + chatml("user", "And 3+3?"), False)


def test_no_assistant_turn_gives_one_prompt_segment():
    tokenizer = chat_tokenizer()
    messages = (Message("user", "Hello"),)
    assert chat_segments(tokenizer, messages) == [Segment(chatml("user", "Hello"), False)]


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tokenizer = chat_tokenizer(REWRITING)
    with pytest.raises(LorakitError, match="data.jsonl:3.*renders earlier turns differently"):
        chat_segments(tokenizer, MULTI, where="data.jsonl:3")


def test_the_default_tokenizers_template(tokenizer):
    """SmolLM2's own template (which adds a default system prompt): the same promises hold."""
    full = render(tokenizer, MULTI[1:])
    segments = chat_segments(tokenizer, MULTI[1:])
    assert "".join(s.text for s in segments) == full.rstrip()
    assert [s.text for s in segments if s.learned] == ["Hello there.<|im_end|>", "Goodbye.<|im_end|>"]
    assert segments[0].text.endswith("<|im_start|>assistant\n") and not segments[0].learned
