"""Prompt templates: alpaca's text, chatml through the tokenizer's chat template, and "auto" choosing
between them."""

from __future__ import annotations

import pytest

from lorakit.data.templates import (ALPACA, CHATML, TEMPLATES, PromptTemplate, get_template, has_chat_template,
                                    instruction_prompt, user_message)
from lorakit.errors import LorakitError
from tests.helpers import ToyTokenizer

CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer():
    """A transformers tokenizer built in memory (no files), with a ChatML chat template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tokenizer.chat_template = CHATML_JINJA
    return tokenizer


# --- alpaca -------------------------------------------------------------------------------------------

def test_alpaca_prompt_with_input():
    prompt = ALPACA.prompt("Add the numbers.", "1 2")
    assert prompt == "### Instruction:\nAdd the numbers.\n\n### Input:\n1 2\n\n### Response:\n"
    assert prompt.endswith(ALPACA.response_prefix)


@pytest.mark.parametrize("blank", ["", "  ", "\n\t"])
def test_alpaca_prompt_without_input_has_no_input_block(blank):
    prompt = ALPACA.prompt("Greet.", blank)
    assert prompt == "### Instruction:\nGreet.\n\n### Response:\n"
    assert "### Input" not in prompt and prompt.endswith(ALPACA.response_prefix)


def test_alpaca_keeps_braces_in_the_text():
    """The instruction is a value, not a format string: braces in it survive."""
    assert "{x} and {}" in ALPACA.prompt("Fill {x} and {}", "{y}")
    assert "{y}" in ALPACA.prompt("Fill {x} and {}", "{y}")


def test_chatml_has_no_text_form():
    with pytest.raises(LorakitError, match="chat template"):
        CHATML.prompt("x")


def test_a_custom_text_template():
    template = PromptTemplate("qa", prompt_with_input="Q: {instruction} ({input})\nA: ", prompt_no_input="Q: {instruction}\nA: ",
                              response_prefix="A: ")
    assert template.prompt("Why?", "context") == "Q: Why? (context)\nA: "
    assert template.prompt("Why?") == "Q: Why?\nA: "
    assert get_template(template) is template


# --- choosing a template --------------------------------------------------------------------------------

def test_auto_chooses_chatml_with_a_chat_template_and_alpaca_without():
    assert get_template("auto", chat_tokenizer()) is CHATML
    assert get_template("auto", ToyTokenizer()) is ALPACA
    assert get_template("auto") is ALPACA


def test_templates_by_name():
    assert set(TEMPLATES) == {"alpaca", "chatml"}
    assert get_template("alpaca", chat_tokenizer()) is ALPACA  # asked for by name: alpaca even with a chat template
    assert get_template("chatml", chat_tokenizer()) is CHATML
    assert get_template("chatml") is CHATML  # no tokenizer to check against


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(LorakitError) as caught:
        get_template("vicuna")
    assert "'vicuna'" in str(caught.value)
    for name in ("auto", "alpaca", "chatml"):
        assert name in str(caught.value)


def test_chatml_needs_a_tokenizer_with_a_chat_template():
    with pytest.raises(LorakitError, match="template=alpaca"):
        get_template("chatml", ToyTokenizer())


def test_has_chat_template():
    assert has_chat_template(chat_tokenizer())
    assert not has_chat_template(ToyTokenizer())
    assert not has_chat_template(None)
    empty = ToyTokenizer()
    empty.chat_template = ""
    assert not has_chat_template(empty)


# --- what the model is prompted with --------------------------------------------------------------------

def test_user_message_joins_the_input_after_a_blank_line():
    assert user_message("Translate.", "bonjour") == "Translate.\n\nbonjour"
    assert user_message("Translate.", " ") == "Translate."
    assert user_message("Translate.") == "Translate."


def test_instruction_prompt_through_the_chat_template():
    tokenizer = chat_tokenizer()
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Translate.\n\nbonjour"}], tokenize=False,
                                             add_generation_prompt=True)
    assert instruction_prompt(tokenizer, "Translate.", "bonjour") == expected
    assert expected == "<|im_start|>user\nTranslate.\n\nbonjour<|im_end|>\n<|im_start|>assistant\n"


def test_instruction_prompt_with_alpaca():
    assert instruction_prompt(ToyTokenizer(), "Add.", "1 2") == ALPACA.prompt("Add.", "1 2")
    assert instruction_prompt(chat_tokenizer(), "Add.", template="alpaca") == ALPACA.prompt("Add.")


def test_instruction_prompt_refuses_chatml_without_a_chat_template():
    with pytest.raises(LorakitError):
        instruction_prompt(ToyTokenizer(), "Add.", template="chatml")
