"""Classification records and labels: names or ids, bad records with file:line, num_labels against the data."""

from __future__ import annotations

import pytest

from lorakit.data.class_batches import ClassExample, LengthGroupedBatches, collate_class, length_grouped_indices, model_inputs
from lorakit.data.classify import LabelSet, load_class_records
from lorakit.errors import LorakitError


def test_names_numbered_in_sorted_order(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"},
                                              {"text": "a", "text_pair": "b", "label": "positive"}])
    records = load_class_records(path).records
    labels = LabelSet.from_records(records)
    assert labels.names == ("negative", "positive")
    assert labels.encode(records, "d.jsonl") == [1, 0, 1]
    assert records[2].text_pair == "b"


def test_integer_ids_and_csv_digits(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nx,0\ny,2\nz,1\n")
    records = load_class_records(path).records
    labels = LabelSet.from_records(records)
    assert labels.by_id and labels.names == ("LABEL_0", "LABEL_1", "LABEL_2")
    assert labels.encode(records, "d.csv") == [0, 2, 1]


def test_missing_and_bad_labels_reported_with_file_and_line(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": "positive"}, {"text": "no label"},
                                              {"text": "bad", "label": "negative"}, {"text": "list", "label": ["x"]}, "{oops"])
    with pytest.raises(LorakitError) as err:
        load_class_records(path, on_bad_record="error")
    message = str(err.value)
    assert "\n" not in message
    assert "d.jsonl:2: missing label" in message and "d.jsonl:4: label must be" in message and "d.jsonl:5" in message
    assert len(load_class_records(path).records) == 2  # skip: the good ones stay


def test_unknown_label_in_eval_data_names_the_line(tmp_path, write_jsonl):
    train = load_class_records(write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])).records
    held = load_class_records(write_jsonl(tmp_path / "e.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "meh"}])).records
    with pytest.raises(LorakitError, match=r"e.jsonl:2: unknown label 'meh'"):
        LabelSet.from_records(train).encode(held, "e.jsonl")


def test_num_labels_must_agree_with_the_data(tmp_path, write_jsonl):
    records = load_class_records(write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])).records
    with pytest.raises(LorakitError, match="num_labels is 3 but the data has 2 labels"):
        LabelSet.from_records(records, num_labels=3)
    ids = load_class_records(write_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 4}])).records
    with pytest.raises(LorakitError, match="num_labels is 3 but the data has label id 4"):
        LabelSet.from_records(ids, num_labels=3)
    assert LabelSet.from_records(ids, num_labels=6).num_labels == 6


def test_one_label_is_refused(tmp_path, write_jsonl):
    records = load_class_records(write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])).records
    with pytest.raises(LorakitError, match="at least two"):
        LabelSet.from_records(records)


def test_mixed_label_kinds_report_the_minority(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": 1}])
    with pytest.raises(LorakitError, match=r"d.jsonl:3: label 1 is an integer id"):
        load_class_records(path, on_bad_record="error")


def test_length_grouped_batches_cover_every_example_once_and_resume():
    lengths = [3, 9, 4, 8, 5, 7, 6, 2, 10, 1] * 5
    groups = length_grouped_indices(lengths, 4, seed=1, epoch=0, window=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == length_grouped_indices(lengths, 4, seed=1, epoch=0, window=3)
    assert groups != length_grouped_indices(lengths, 4, seed=1, epoch=1, window=3)
    examples = [ClassExample(list(range(1, n + 1)), i % 2) for i, n in enumerate(lengths)]
    batcher = LengthGroupedBatches(pad_token_id=0)
    full = list(batcher(examples, 4, seed=1, epoch=0))
    resumed = list(batcher(examples, 4, seed=1, epoch=0, start=5))
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(full[5:], resumed))
    padded = sum(sum(b["padding"]) for b in full)
    unsorted = sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g)
                   for g in [list(range(k, min(k + 4, 50))) for k in range(0, 50, 4)])
    assert padded < unsorted


def test_collate_pads_right_with_mask_and_types():
    batch = collate_class([ClassExample([5, 6, 7], 1, [0, 0, 1]), ClassExample([8], 0, [0])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["padding"] == [0, 2]


def test_model_inputs_drop_the_mask_only_when_no_row_is_padded():
    padded = collate_class([ClassExample([5, 6], 1, [0, 1]), ClassExample([8], 0, [0])], pad_token_id=0)
    assert sorted(model_inputs(padded)) == ["attention_mask", "input_ids", "token_type_ids"]
    even = collate_class([ClassExample([5, 6], 1), ClassExample([8, 9], 0)], pad_token_id=0)
    assert sorted(model_inputs(even)) == ["input_ids"]
