"""Prompt templates: how an instruction record becomes a prompt.

Two kinds:
- a text template (`alpaca`): fixed strings around the instruction, then the response and EOS;
- `chatml`: the tokenizer's own chat template (`apply_chat_template`), with the instruction (and its
  input, after a blank line) as the user's message. The name is historical; any model's template
  is used, ChatML or not.

The default, "auto", is `chatml` when the tokenizer has a chat template and `alpaca` otherwise: an
instruct model was tuned on its own template, so an adapter trained through it starts from what the
model already knows and is used at inference exactly as `generate` and vLLM prompt it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.data.chat import render
from lorakit.data.formats import Message
from lorakit.errors import LorakitError


@dataclass(frozen=True)
class PromptTemplate:
    """Text around an instruction record; `uses_chat_template` means the tokenizer renders it instead."""

    name: str
    prompt_with_input: str = ""
    """Format string with {instruction} and {input}."""
    prompt_no_input: str = ""
    """Format string with {instruction}, used when the input is empty."""
    response_prefix: str = ""
    """What the prompt ends with, just before the response (part of the prompt, so not learned)."""
    uses_chat_template: bool = False

    def prompt(self, instruction: str, input: str = "") -> str:
        """The prompt text for an instruction record (text templates only)."""
        if self.uses_chat_template:
            raise LorakitError(f"template {self.name!r} renders through the tokenizer's chat template, not as text")
        if input.strip():
            return self.prompt_with_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)


ALPACA = PromptTemplate(
    name="alpaca",
    prompt_with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    prompt_no_input="### Instruction:\n{instruction}\n\n### Response:\n",
    response_prefix="### Response:\n",
)
CHATML = PromptTemplate(name="chatml", uses_chat_template=True)

TEMPLATES = {template.name: template for template in (ALPACA, CHATML)}


def user_message(instruction: str, input: str = "") -> str:
    """The user's turn for an instruction record under a chat template."""
    return f"{instruction}\n\n{input}" if input.strip() else instruction


def get_template(name: str | PromptTemplate, tokenizer=None) -> PromptTemplate:
    """A template by name; "auto" chooses chatml when `tokenizer` has a chat template, else alpaca.

    Raises:
        LorakitError: an unknown name, or chatml for a tokenizer without a chat template.
    """
    if isinstance(name, PromptTemplate):
        template = name
    elif name == "auto":
        template = CHATML if has_chat_template(tokenizer) else ALPACA
    elif name in TEMPLATES:
        template = TEMPLATES[name]
    else:
        raise LorakitError(f"prompt template {name!r} is unknown; use auto, {', '.join(TEMPLATES)}")
    if template.uses_chat_template and tokenizer is not None and not has_chat_template(tokenizer):
        raise LorakitError(f"template {template.name!r} needs a tokenizer with a chat template, and this one has none; use template=alpaca")
    return template


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def instruction_prompt(tokenizer, instruction: str, input: str = "", template: str | PromptTemplate = "auto") -> str:
    """The text a model is prompted with at inference, exactly as training rendered the prompt."""
    template = get_template(template, tokenizer)
    if template.uses_chat_template:
        return render(tokenizer, [Message("user", user_message(instruction, input))], add_generation_prompt=True)
    return template.prompt(instruction, input)
