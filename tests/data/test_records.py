"""Formats are detected and parsed; every kind of bad record is reported with its location."""

import logging

import pytest

from lorakit.data import Message, load_records
from lorakit.errors import LorakitError

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}


@pytest.fixture
def load(tmp_path, write_jsonl):
    return lambda records, **kwargs: load_records(write_jsonl(tmp_path / "d.jsonl", records), **kwargs)


def test_alpaca(load):
    records = load([{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Greet.", "output": "Hi"}])
    assert records.format == "alpaca"
    first, second = records.samples
    assert (first.instruction, first.input, first.output, first.where) == ("Add.", "1 2", "3", "d.jsonl:1")
    assert (second.input, second.kind) == ("", "instruction")


def test_dolly(load):
    records = load([{"instruction": "Sum up.", "context": "A long text.", "response": "Short.", "category": "summarization"}])
    assert records.format == "dolly"
    sample = records.samples[0]
    assert (sample.instruction, sample.input, sample.output) == ("Sum up.", "A long text.", "Short.")


def test_chat(load):
    records = load([CHAT])
    assert records.format == "chat"
    assert records.samples[0].messages == (Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello."))


def test_sharegpt_roles_are_mapped(load):
    records = load([SHAREGPT])
    assert records.format == "sharegpt"
    assert records.samples[0].messages == (Message("user", "Hi"), Message("assistant", "Hello."))


def test_text(load):
    records = load([{"text": "Once upon a time."}])
    assert (records.format, records.samples[0].text, records.samples[0].kind) == ("text", "Once upon a time.", "text")


def test_named_format_overrides_detection(load):
    records = load([{"instruction": "Add.", "output": "3", "text": "ignored"}], format="text")
    assert records.samples[0].text == "ignored"


def test_undetectable_format(load):
    with pytest.raises(LorakitError, match=r"cannot detect the data format.*prompt, reply"):
        load([{"prompt": "a", "reply": "b"}])


def test_unknown_format_name(load):
    with pytest.raises(LorakitError, match="format 'vicuna' is unknown"):
        load([CHAT], format="vicuna")


def test_missing_field(load):
    with pytest.raises(LorakitError, match=r"d\.jsonl:2: missing field 'output' \(fields present: input, instruction\)"):
        load([{"instruction": "a", "output": "b"}, {"instruction": "a", "input": "x"}], on_bad_record="error")


def test_empty_response(load):
    with pytest.raises(LorakitError, match=r"d\.jsonl:2: field 'response' is empty"):
        load([{"instruction": "a", "response": "b"}, {"instruction": "a", "response": "  "}], on_bad_record="error")


def test_empty_assistant_turn(load):
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    with pytest.raises(LorakitError, match=r"d\.jsonl:2: messages: assistant turn 1 is empty"):
        load([CHAT, bad], on_bad_record="error")


def test_wrong_type(load):
    with pytest.raises(LorakitError, match=r"d\.jsonl:2: field 'output' must be a string, got int 3"):
        load([{"instruction": "a", "output": "b"}, {"instruction": "Add.", "output": 3}], on_bad_record="error")


def test_unknown_role(load):
    bad = {"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    with pytest.raises(LorakitError, match=r"d\.jsonl:2: turn 0: unknown from 'robot'"):
        load([SHAREGPT, bad], on_bad_record="error")


def test_bad_json_line_with_line_number(load):
    lines = ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": ', '{"instruction": "c", "output": "d"}']
    with pytest.raises(LorakitError, match=r"1 bad record\(s\).*d\.jsonl:2: invalid JSON"):
        load(lines, on_bad_record="error")


def test_bad_csv_row_with_line_number(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nAdd.,1 2,3\nGreet.,,\n")
    with pytest.raises(LorakitError, match=r"d\.csv:3: field 'output' is empty"):
        load_records(path, on_bad_record="error")


def test_error_lists_the_first_few(load):
    records = [{"instruction": "a", "output": "b"}] + [{"instruction": "a"}] * 8
    with pytest.raises(LorakitError, match=r"8 bad record\(s\).*d\.jsonl:6: .*; and 3 more; fix them or set on_bad_record=skip"):
        load(records, on_bad_record="error")


def test_skip_drops_bad_records_with_one_warning(load, caplog):
    lines = ['{"instruction": "a", "output": "b"}', "not json", '{"instruction": "c"}', '{"instruction": "d", "output": "e"}']
    with caplog.at_level(logging.WARNING, logger="lorakit.data"):
        records = load(lines)
    assert [s.where for s in records.samples] == ["d.jsonl:1", "d.jsonl:4"]
    assert [b.where for b in records.skipped] == ["d.jsonl:2", "d.jsonl:3"]
    [message] = [r.getMessage() for r in caplog.records]
    assert "skipped 2 bad record(s) of 4" in message and "d.jsonl:2: invalid JSON" in message


def test_empty_dataset(load):
    with pytest.raises(LorakitError, match=r"no usable training records in .*d\.jsonl: it holds no records"):
        load([])


def test_dataset_of_only_bad_records_is_empty(load):
    with pytest.raises(LorakitError, match=r"no usable training records.*all 2 record\(s\) are bad: d\.jsonl:1: field 'output' is empty"):
        load([{"instruction": "a", "output": ""}, {"instruction": "b", "output": ""}])


def test_unknown_bad_record_policy(load):
    with pytest.raises(LorakitError, match="on_bad_record 'ignore' is unknown; use one of skip, error"):
        load([CHAT], on_bad_record="ignore")


def test_chat_must_end_with_the_assistant(load):
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]}
    with pytest.raises(LorakitError, match="last turn must be the assistant's"):
        load([CHAT, bad], on_bad_record="error")
