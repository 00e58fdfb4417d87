"""Read and validate a data file without a tokenizer, so a bad file fails before any model loads."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from lorakit.data.formats import FORMATS, BadRecordError, Sample, detect_format, parse_record
from lorakit.data.readers import RawRecord, read_records
from lorakit.errors import LorakitError

T = TypeVar("T")

log = logging.getLogger("lorakit.data")

BAD_RECORD_POLICIES = ("skip", "error")
SHOWN = 5
"""How many bad records an error or warning lists by location."""


@dataclass(frozen=True)
class BadRecord:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Records:
    """The usable records of one file, the bad ones that were skipped, and the format used."""

    samples: list[Sample]
    format: str
    skipped: list[BadRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


def load_records(path: str | os.PathLike, format: str = "auto", on_bad_record: str = "skip") -> Records:
    """Read `path`, detect or apply `format`, and validate every record; no tokenizer needed.

    Args:
        path: a local JSONL / JSON / CSV / parquet file or a `save_to_disk` directory.
        format: "auto" or one of alpaca, dolly, chat, sharegpt, text.
        on_bad_record: "skip" drops bad records and logs one warning summing them up;
            "error" refuses the file, listing the first few.

    Raises:
        LorakitError: a missing file, an unknown format or policy, bad records under "error",
            or no usable record at all.
    """
    check_choice("format", format, FORMATS)
    check_choice("on_bad_record", on_bad_record, BAD_RECORD_POLICIES)
    raw = read_records(path)
    if format == "auto":
        format = _detect(raw, path)
    samples, bad = parse_all(raw, lambda data, where: parse_record(data, where, format))
    name = os.fspath(path)
    if bad and on_bad_record == "error":
        raise LorakitError(f"{len(bad)} bad record(s) in {name} (format {format}): {bad_listing(bad)}; fix them or set on_bad_record=skip")
    if not samples:
        reason = f"all {len(raw)} record(s) are bad: {bad_listing(bad)}" if bad else "it holds no records"
        raise LorakitError(f"no usable training records in {name}: {reason}")
    if bad:
        log.warning("skipped %d bad record(s) of %d in %s (format %s): %s", len(bad), len(raw), name, format, bad_listing(bad))
    return Records(samples, format, bad)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LorakitError(f"{name} {value!r} is unknown; use one of {', '.join(choices)}")


def _detect(raw: list[RawRecord], path: str | os.PathLike) -> str:
    first = next((r for r in raw if r.error is None), None)
    if first is None:
        return "text"  # nothing parses: every record is reported as bad below
    try:
        return detect_format(first.data)
    except LorakitError as err:
        raise LorakitError(f"{os.fspath(path)}: {err}") from None


def parse_all(raw: list[RawRecord], parse: Callable[[Any, str], T]) -> tuple[list[T], list[BadRecord]]:
    """`parse(data, where)` on every record: the parsed ones, and the bad ones with their locations."""
    parsed, bad = [], []
    for record in raw:
        if record.error is not None:
            bad.append(BadRecord(record.where, record.error))
            continue
        try:
            parsed.append(parse(record.data, record.where))
        except BadRecordError as err:
            bad.append(BadRecord(record.where, str(err)))
    return parsed, bad


def bad_listing(bad: list[BadRecord]) -> str:
    shown = "; ".join(str(b) for b in bad[:SHOWN])
    return shown + (f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
