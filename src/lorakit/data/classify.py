"""Classification records: `{"text": ..., "label": ...}` (and `text_pair` for pairs), and their label set.

    records = load_class_records("train.jsonl")          # no tokenizer: bad records fail here, with file:line
    labels = LabelSet.from_records(records.records)       # id2label / label2id from the data
    ids = labels.encode(records.records, "train.jsonl")   # a label the set lacks: reported with file:line

Labels are names ("positive") or integer ids (0, 1, ...; a CSV's "1" counts as an id). One file holds one
kind: names are numbered in sorted order (negative = 0, positive = 1), ids keep their value and get the
names LABEL_0, LABEL_1, ... unless a model's own `id2label` names them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from lorakit.data.formats import BadRecordError
from lorakit.data.readers import read_records
from lorakit.data.records import BAD_RECORD_POLICIES, BadRecord, bad_listing, check_choice, log, parse_all
from lorakit.errors import LorakitError

TEXT, TEXT_PAIR, LABEL = "text", "text_pair", "label"


@dataclass(frozen=True)
class ClassRecord:
    """One validated classification record; `label` is a name (str) or an id (int), as the file has it."""

    where: str
    text: str
    label: str | int
    text_pair: str | None = None


@dataclass
class ClassRecords:
    records: list[ClassRecord]
    skipped: list[BadRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


def parse_class_record(record: Any, where: str) -> ClassRecord:
    """One raw record -> a `ClassRecord`.

    Raises:
        BadRecordError: not an object, no usable text, or a missing / empty / non-scalar label.
    """
    if not isinstance(record, dict):
        raise BadRecordError(f"expected a JSON object with fields text and label, got a {type(record).__name__}")
    present = ", ".join(sorted(map(str, record))) or "none"
    text = record.get(TEXT)
    if not isinstance(text, str) or not text.strip():
        raise BadRecordError(f"field 'text' is missing or empty (fields present: {present})" if not isinstance(text, str)
                             else "field 'text' is empty")
    pair = record.get(TEXT_PAIR)
    if pair is not None and not isinstance(pair, str):
        raise BadRecordError(f"field 'text_pair' must be a string, got {type(pair).__name__}")
    return ClassRecord(where, text, _label(record, present), pair or None)


def _label(record: dict, present: str) -> str | int:
    value = record.get(LABEL)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadRecordError(f"missing label (fields present: {present}); every record needs a 'label'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRecordError(f"label must be a name or an integer id, got {type(value).__name__} {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise BadRecordError(f"label {value!r} is not a whole number; use names or integer ids")
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # CSV cells are text: "1" is the id 1
    if isinstance(value, int) and value < 0:
        raise BadRecordError(f"label {value} is negative; ids start at 0")
    return value.strip() if isinstance(value, str) else value


def load_class_records(path: str | os.PathLike, on_bad_record: str = "skip") -> ClassRecords:
    """Read and validate the classification records of `path` (any format `read_records` reads).

    Raises:
        LorakitError: a missing file, bad records under "error", or no usable record at all.
    """
    check_choice("on_bad_record", on_bad_record, BAD_RECORD_POLICIES)
    raw = read_records(path)
    records, bad = parse_all(raw, parse_class_record)
    bad += _mixed_kinds(records)
    if bad and on_bad_record == "error":
        raise LorakitError(f"{len(bad)} bad classification record(s) in {os.fspath(path)}: {bad_listing(bad)}; fix them or set on_bad_record=skip")
    wrong = {b.where for b in bad}
    records = [r for r in records if r.where not in wrong]
    if not records:
        reason = f"all {len(raw)} record(s) are bad: {bad_listing(bad)}" if bad else "it holds no records"
        raise LorakitError(f"no usable classification records in {os.fspath(path)}: {reason}")
    if bad:
        log.warning("skipped %d bad classification record(s) of %d in %s: %s", len(bad), len(raw), os.fspath(path), bad_listing(bad))
    return ClassRecords(records, bad)


def _mixed_kinds(records: Sequence[ClassRecord]) -> list[BadRecord]:
    """A file with label names uses names throughout: ids among them are reported (the minority kind)."""
    ids = [r for r in records if isinstance(r.label, int)]
    if not ids or len(ids) == len(records):
        return []
    names = sorted({r.label for r in records if isinstance(r.label, str)})
    minority = ids if len(ids) <= len(records) - len(ids) else [r for r in records if isinstance(r.label, str)]
    kind = "an integer id" if minority is ids else "a name"
    return [BadRecord(r.where, f"label {r.label!r} is {kind} but most labels here are the other kind "
                                f"(names: {', '.join(names[:4])}); use one kind") for r in minority]


@dataclass(frozen=True)
class LabelSet:
    """The classes: `names[i]` is the name of id i (transformers' `id2label`)."""

    names: tuple[str, ...]
    by_id: bool = False
    """True when the data gives integer ids (names are then only for display)."""

    @classmethod
    def from_records(cls, records: Iterable[ClassRecord], num_labels: int = 0, id2label: dict[int, str] | None = None) -> LabelSet:
        """Labels seen in the data; `num_labels` (> 0) must agree with them, `id2label` (a model's own) names ids.

        Raises:
            LorakitError: fewer than two classes, or `num_labels` disagreeing with the data.
        """
        labels = {r.label for r in records}
        if all(isinstance(v, int) for v in labels):
            count = max(labels) + 1 if labels else 0
            if num_labels and num_labels < count:
                raise LorakitError(f"num_labels is {num_labels} but the data has label id {max(labels)}; "
                                   f"set num_labels >= {count} or fix the labels")
            count = num_labels or count
            names = tuple((id2label or {}).get(i, f"LABEL_{i}") for i in range(count))
            found = cls(names, by_id=True)
        else:
            found = cls(tuple(sorted(map(str, labels))))
            if num_labels and num_labels != len(found.names):
                raise LorakitError(f"num_labels is {num_labels} but the data has {len(found.names)} labels "
                                   f"({', '.join(found.names[:8])}); drop num_labels or fix the data")
        if len(found.names) < 2:
            raise LorakitError(f"the data has one label only ({', '.join(map(str, labels))}); a classifier needs at least two")
        return found

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def id_of(self, label: str | int) -> int | None:
        """The id of a label as a record gives it, or None when the set has no such label."""
        if isinstance(label, int):
            return label if 0 <= label < self.num_labels else None
        return self.label2id.get(label)

    def encode(self, records: Sequence[ClassRecord], source: str) -> list[int]:
        """Every record's label id.

        Raises:
            LorakitError: records whose label the set lacks, each with its file and line.
        """
        ids = [self.id_of(r.label) for r in records]
        unknown = [BadRecord(r.where, f"unknown label {r.label!r}") for r, i in zip(records, ids) if i is None]
        if unknown:
            known = ", ".join(self.names[:8]) if not self.by_id else f"ids 0-{self.num_labels - 1}"
            raise LorakitError(f"{len(unknown)} record(s) in {source} have labels the classifier does not know ({known}): {bad_listing(unknown)}")
        return [int(i) for i in ids]  # type: ignore[arg-type]
