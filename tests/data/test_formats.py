"""Record formats: detect_format from a record's fields, parse_record into Samples, and the one-line
reason a bad record is refused."""

from __future__ import annotations

import pytest

from lorakit.data.formats import FORMATS, PARSERS, BadRecordError, Message, Sample, detect_format, parse_record
from lorakit.errors import LorakitError

RECORDS = {
    "alpaca": {"instruction": "Add.", "input": "1 2", "output": "3"},
    "dolly": {"instruction": "Summarise.", "context": "A long text.", "response": "Short."},
    "chat": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    "text": {"text": "Once upon a time."},
}


def test_every_parser_is_a_named_format():
    assert set(PARSERS) == set(FORMATS) - {"auto"} == set(RECORDS)


@pytest.mark.parametrize("format", sorted(RECORDS))
def test_detect_format_on_each_formats_record(format):
    assert detect_format(RECORDS[format]) == format


@pytest.mark.parametrize("record, format", [
    ({"instruction": "x", "output": "y"}, "alpaca"),  # input is optional
    ({"instruction": "x", "response": "y"}, "dolly"),  # context is optional
    ({"messages": [], "text": "t"}, "chat"),  # the conversation fields win over text
    ({"conversations": [], "text": "t"}, "sharegpt"),
    ({"instruction": "x", "output": "y", "text": "t"}, "alpaca"),
    ({"text": "t", "meta": 1}, "text"),  # extra fields are ignored
])
def test_detect_format_field_combinations(record, format):
    assert detect_format(record) == format


@pytest.mark.parametrize("record, says", [
    ({"instruction": "x"}, "instruction"),  # neither output nor response
    ({"question": "q", "answer": "a"}, "answer, question"),  # the fields present, sorted
    ({}, "no fields"),
    (["a", "b"], "a list, not an object"),
    ("text", "a str, not an object"),
])
def test_detect_format_refuses_unknown_fields(record, says):
    with pytest.raises(LorakitError) as caught:
        detect_format(record)
    message = str(caught.value)
    assert says in message
    assert "format=" in message  # says how to name the format instead
    assert "\n" not in message


# --- parse_record -------------------------------------------------------------------------------------

def test_parse_alpaca_and_dolly_give_the_same_instruction_sample():
    alpaca = parse_record(RECORDS["alpaca"], "a.jsonl:1", "alpaca")
    assert alpaca == Sample("a.jsonl:1", instruction="Add.", input="1 2", output="3")
    assert alpaca.kind == "instruction"
    dolly = parse_record(RECORDS["dolly"], "d.jsonl:4", "dolly")
    assert (dolly.instruction, dolly.input, dolly.output) == ("Summarise.", "A long text.", "Short.")
    assert dolly.where == "d.jsonl:4" and dolly.kind == "instruction"


@pytest.mark.parametrize("value", [None, ""])
def test_an_optional_input_may_be_missing_null_or_empty(value):
    record = {"instruction": "x", "output": "y"} if value is None else {"instruction": "x", "input": value, "output": "y"}
    assert parse_record(record, "w", "alpaca").input == ""
    assert parse_record({"instruction": "x", "context": None, "response": "y"}, "w", "dolly").input == ""


def test_parse_text():
    sample = parse_record(RECORDS["text"], "t:1", "text")
    assert sample.text == "Once upon a time." and sample.kind == "text"


def test_parse_chat_and_sharegpt_give_the_same_conversation():
    expected = (Message("user", "Hi"), Message("assistant", "Hello"))
    chat = parse_record(RECORDS["chat"], "c:1", "chat")
    sharegpt = parse_record(RECORDS["sharegpt"], "s:1", "sharegpt")
    assert chat.messages == sharegpt.messages == expected
    assert chat.kind == sharegpt.kind == "chat"


def test_sharegpt_roles_map_to_chat_roles():
    sources = ["system", "human", "gpt", "user", "tool", "assistant"]
    record = {"conversations": [{"from": s, "value": f"turn {i}"} for i, s in enumerate(sources)]}
    messages = parse_record(record, "s", "sharegpt").messages
    assert [m.role for m in messages] == ["system", "user", "assistant", "user", "tool", "assistant"]
    assert [m.content for m in messages] == [f"turn {i}" for i in range(len(sources))]


def test_a_system_turn_may_come_first_and_a_user_turn_may_be_empty():
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": None},
                           {"role": "assistant", "content": "Ok."}]}
    messages = parse_record(record, "c", "chat").messages
    assert [m.role for m in messages] == ["system", "user", "assistant"]
    assert messages[1].content == ""


# --- bad records --------------------------------------------------------------------------------------

@pytest.mark.parametrize("format, record, says", [
    ("alpaca", {"instruction": "x"}, "missing field 'output' (fields present: instruction)"),
    ("alpaca", {}, "missing field 'instruction' (fields present: none)"),
    ("alpaca", {"instruction": "x", "output": 3}, "field 'output' must be a string, got int 3"),
    ("alpaca", {"instruction": "  \n", "output": "y"}, "field 'instruction' is empty"),
    ("alpaca", {"instruction": "x", "input": ["a"], "output": "y"}, "field 'input' must be a string, got list"),
    ("dolly", {"instruction": "x", "output": "y"}, "missing field 'response'"),
    ("text", {"text": ""}, "field 'text' is empty"),
    ("text", {"body": "b"}, "missing field 'text' (fields present: body)"),
    ("chat", {"messages": "hi"}, "field 'messages' must be a list of turns, got str"),
    ("chat", {"messages": None}, "missing field 'messages'"),
    ("chat", {"messages": []}, "field 'messages' is empty"),
    ("chat", {"messages": ["hi"]}, "turn 0 must be an object with 'role' and 'content', got str"),
    ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "turn 1: unknown role 'bot'"),
    ("chat", {"messages": [{"content": "q"}]}, "turn 0: missing field 'role'"),
    ("chat", {"messages": [{"role": "assistant", "content": "a"}]}, "the first non-system turn must be from the user"),
    ("chat", {"messages": [{"role": "system", "content": "s"}]}, "the first non-system turn must be from the user"),
    ("chat", {"messages": [{"role": "user", "content": "q"}]}, "the last turn must be the assistant's (it is the user's)"),
    ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}, "assistant turn 1 is empty"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}, "turn 1: unknown from 'robot'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}]}, "conversations: the last turn must be the assistant's"),
])
def test_bad_record_errors_say_what_is_wrong(format, record, says):
    with pytest.raises(BadRecordError) as caught:
        parse_record(record, "f.jsonl:7", format)
    assert says in str(caught.value)


@pytest.mark.parametrize("record", [["instruction", "output"], "text", 3, None])
def test_a_record_that_is_not_an_object(record):
    with pytest.raises(BadRecordError, match=f"expected a JSON object with fields, got a {type(record).__name__}"):
        parse_record(record, "w", "alpaca")


def test_a_long_wrong_value_is_shortened_in_the_message():
    value = list(range(100))
    with pytest.raises(BadRecordError) as caught:
        parse_record({"instruction": "x", "output": value}, "w", "alpaca")
    message = str(caught.value)
    assert repr(value) not in message
    shown = message.split("got list ", 1)[1]
    assert len(shown) == 40 and shown.endswith("...") and repr(value).startswith(shown[:-3])


def test_a_bad_record_error_is_a_value_error_not_a_lorakit_error():
    """The caller (load_records) adds the location and decides to skip or refuse."""
    assert issubclass(BadRecordError, ValueError) and not issubclass(BadRecordError, LorakitError)
