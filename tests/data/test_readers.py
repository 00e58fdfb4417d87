import json

import pytest

from lorakit.data import load_records, read_records
from lorakit.errors import LorakitError

ALPACA = [{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Greet.", "input": "", "output": "Hello!"}]


def test_jsonl(tmp_path, write_jsonl):
    records = read_records(write_jsonl(tmp_path / "d.jsonl", ALPACA))
    assert [r.data for r in records] == ALPACA
    assert [r.where for r in records] == ["d.jsonl:1", "d.jsonl:2"]


def test_jsonl_skips_blank_lines_but_keeps_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + json.dumps(ALPACA[1]) + "\n")
    assert [r.where for r in read_records(path)] == ["d.jsonl:1", "d.jsonl:3"]


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ALPACA))
    records = read_records(path)
    assert [r.data for r in records] == ALPACA
    assert records[1].where == "d.json record 1"


def test_json_that_is_not_a_list_is_refused(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"a": 1, "b": 2}))
    with pytest.raises(LorakitError, match="list of records"):
        read_records(path)


def test_csv_with_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nAdd.,1 2,3\nGreet.,,Hello!\n")
    records = read_records(path)
    assert [r.data for r in records] == ALPACA
    assert [r.where for r in records] == ["d.csv:2", "d.csv:3"]


def test_parquet(tmp_path):
    from datasets import Dataset

    Dataset.from_list(ALPACA).to_parquet(str(tmp_path / "d.parquet"))
    assert [r.data for r in read_records(tmp_path / "d.parquet")] == ALPACA


def test_save_to_disk_directory(tmp_path):
    from datasets import Dataset

    Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "saved"))
    records = read_records(tmp_path / "saved")
    assert [r.data for r in records] == ALPACA
    assert records[0].where == "saved record 0"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(LorakitError, match=r"does not exist.*local JSONL"):
        load_records(tmp_path / "nope.jsonl")


def test_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(LorakitError, match="suffix"):
        read_records(path)


def test_plain_directory_is_refused(tmp_path):
    with pytest.raises(LorakitError, match="save_to_disk"):
        read_records(tmp_path)
