"""The shipped sentiment task: deterministic, balanced, train and eval disjoint."""

from lorakit.tasks.sentiment import LABELS, train_eval_records


def test_deterministic_balanced_and_disjoint():
    train, held = train_eval_records(200, 60)
    assert (train, held) == train_eval_records(200, 60)
    assert {r["label"] for r in train} == set(LABELS)
    assert sum(r["label"] == "positive" for r in train) == 100
    assert not {r["text"] for r in train} & {r["text"] for r in held}
