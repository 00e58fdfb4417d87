"""The shipped order -> JSON task: deterministic, disjoint splits, short, exactly checkable."""

import json

from lorakit.data import load_records, tokenize_samples
from lorakit.tasks.order_json import DEFAULT_MAX_NEW_TOKENS, EVAL_FILE, INSTRUCTION, TRAIN_FILE, make_records, train_eval_records, write_dataset


def test_generator_is_deterministic():
    assert make_records(50, seed=3) == make_records(50, seed=3)
    assert make_records(50, seed=3) != make_records(50, seed=4)


def test_known_record():
    # Frozen: changing the generator changes the shipped data set; update this on purpose only.
    first = make_records(1, seed=0)[0]
    assert first == {
        "instruction": INSTRUCTION,
        "input": "On 16 May 2025, Amara Novak bought five chairs at $63.00 apiece.",
        "output": '{"name":"Amara Novak","item":"chair","qty":5,"price":63,"date":"2025-05-16"}',
    }


def test_train_and_eval_share_no_input():
    train, held = train_eval_records(300, 50, seed=1)
    assert len(train) == 300 and len(held) == 50
    assert not {r["input"] for r in train} & {r["input"] for r in held}


def test_answers_are_normalized_json():
    for record in make_records(200, seed=2):
        answer = json.loads(record["output"])
        assert list(answer) == ["name", "item", "qty", "price", "date"]
        assert isinstance(answer["qty"], int) and isinstance(answer["price"], (int, float))
        assert answer["name"] in record["input"] and answer["item"] in record["input"]
        assert "$" not in record["output"] and " " not in record["output"].replace(answer["name"], "")


def test_write_dataset_round_trips_through_load_records(tmp_path):
    train_path, eval_path = write_dataset(tmp_path, n_train=20, n_eval=5, seed=0)
    assert (train_path.name, eval_path.name) == (TRAIN_FILE, EVAL_FILE)
    records = load_records(train_path)
    assert records.format == "alpaca" and len(records) == 20 and not records.skipped
    assert len(load_records(eval_path)) == 5


def test_examples_are_short_and_answers_fit_max_new_tokens(tokenizer):
    train, _ = train_eval_records(200, 0, seed=0)
    longest_answer = max(len(tokenizer.encode(r["output"])) for r in train)
    assert longest_answer < DEFAULT_MAX_NEW_TOKENS  # room for the end-of-turn token
    from lorakit.data.formats import Sample

    samples = [Sample(str(i), instruction=r["instruction"], input=r["input"], output=r["output"]) for i, r in enumerate(train)]
    examples, stats = tokenize_samples(samples, tokenizer, max_seq_len=256)
    assert stats.truncated == 0 and max(map(len, examples)) <= 160
