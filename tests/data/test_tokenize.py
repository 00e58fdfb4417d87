"""Prompt tokens carry -100, replies and the final EOS are learned, with the default model's tokenizer."""

import logging

import pytest

from lorakit.data import ALPACA, CHATML, IGNORE_INDEX, Message, Sample, get_template, instruction_prompt, tokenize_sample, tokenize_samples
from lorakit.errors import LorakitError

INSTRUCTION = Sample("d.jsonl:1", instruction="Add the numbers.", input="1 2", output="3")
CONVERSATION = Sample(
    "d.jsonl:2",
    messages=(Message("user", "Hi"), Message("assistant", "Hello there."), Message("user", "Bye"), Message("assistant", "Goodbye.")),
)


def learned_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_prompt_is_masked_and_eos_is_learned(tokenizer):
    example = tokenize_sample(INSTRUCTION, tokenizer, CHATML)
    eos = tokenizer.eos_token_id
    assert example.labels[-1] == eos and example.input_ids[-1] == eos
    assert learned_text(tokenizer, example) == "3<|im_end|>"
    prompt = tokenizer.encode(instruction_prompt(tokenizer, INSTRUCTION.instruction, INSTRUCTION.input))
    assert example.input_ids[: len(prompt)] == prompt  # training prompt == inference prompt, token for token
    assert example.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)


def test_chat_template_eos_is_not_doubled(tokenizer):
    example = tokenize_sample(INSTRUCTION, tokenizer, CHATML)
    assert example.input_ids[-2:] != [tokenizer.eos_token_id] * 2
    assert tokenizer.decode(example.input_ids).endswith("<|im_start|>assistant\n3<|im_end|>")


def test_alpaca_template(tokenizer):
    example = tokenize_sample(INSTRUCTION, tokenizer, ALPACA)
    text = tokenizer.decode(example.input_ids)
    assert text == "### Instruction:\nAdd the numbers.\n\n### Input:\n1 2\n\n### Response:\n3<|im_end|>"
    assert learned_text(tokenizer, example) == "3<|im_end|>"
    assert example.labels[-1] == tokenizer.eos_token_id


def test_alpaca_template_without_input_block(tokenizer):
    sample = Sample("x", instruction="Greet.", output="Hi")
    text = tokenizer.decode(tokenize_sample(sample, tokenizer, ALPACA).input_ids)
    assert text == "### Instruction:\nGreet.\n\n### Response:\nHi<|im_end|>"


def test_multi_turn_learns_every_assistant_turn_only(tokenizer):
    example = tokenize_sample(CONVERSATION, tokenizer, CHATML)
    assert learned_text(tokenizer, example) == "Hello there.<|im_end|>Goodbye.<|im_end|>"
    assert example.labels[-1] == tokenizer.eos_token_id


def test_train_on_inputs_learns_everything(tokenizer):
    example = tokenize_sample(INSTRUCTION, tokenizer, CHATML, train_on_inputs=True)
    assert example.labels == example.input_ids


def test_raw_text_is_learned_whole_and_ends_with_eos(tokenizer):
    example = tokenize_sample(Sample("x", text="Once upon a time."), tokenizer, CHATML)
    assert tokenizer.decode(example.input_ids) == "Once upon a time.<|im_end|>"
    assert example.labels == example.input_ids


def test_default_template_is_the_chat_template_when_there_is_one(tokenizer):
    assert get_template("auto", tokenizer) is CHATML


def test_alpaca_template_refuses_multi_turn(tokenizer):
    with pytest.raises(LorakitError, match=r"d\.jsonl:2: template 'alpaca' renders one user/assistant exchange.*template=chatml"):
        tokenize_sample(CONVERSATION, tokenizer, ALPACA)


def test_unknown_template(tokenizer):
    with pytest.raises(LorakitError, match="prompt template 'vicuna' is unknown"):
        get_template("vicuna", tokenizer)


def test_truncation_keeps_the_start_and_is_counted(tokenizer, caplog):
    long = Sample("x", instruction="Repeat.", output="word " * 100)
    with caplog.at_level(logging.WARNING, logger="lorakit.data"):
        examples, stats = tokenize_samples([INSTRUCTION, long], tokenizer, max_seq_len=64)
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 1, 0)
    full = tokenize_sample(long, tokenizer, CHATML)
    assert examples[1].input_ids == full.input_ids[:64]
    assert "1 truncated" in caplog.text


def test_example_whose_prompt_fills_max_seq_len_is_dropped(tokenizer):
    long_prompt = Sample("x", instruction="word " * 100, output="ok")
    examples, stats = tokenize_samples([INSTRUCTION, long_prompt], tokenizer, max_seq_len=64)
    assert (len(examples), stats.truncated, stats.dropped) == (1, 1, 1)
