"""Read local data files into raw records, each tagged with where it came from.

Formats: JSONL, JSON (a list of objects), CSV, parquet, and a directory written by
`datasets.Dataset.save_to_disk`. Parquet is read with pyarrow and on-disk datasets with `datasets`
(Arrow files); nothing is ever unpickled. Only local paths are read: the hub is never contacted.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lorakit.errors import LorakitError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class RawRecord:
    """One record as read, before any validation.

    `data` is a dict when the file held an object there; anything else (a list, a number, a string
    that was no JSON at all) is kept so the validator can report it with its location."""

    where: str
    """"train.jsonl:12" (1-based line) for JSONL and CSV, "train.parquet record 5" (0-based) otherwise."""
    data: Any
    error: str | None = None
    """Why the record could not even be parsed (e.g. invalid JSON), or None."""


def read_records(path: str | os.PathLike) -> list[RawRecord]:
    """All records of a local file or `save_to_disk` directory, in file order.

    Raises:
        LorakitError: the path does not exist, or its kind is not one lorakit reads.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise LorakitError(f"data file {str(path)!r} does not exist; pass a local JSONL, JSON, CSV or parquet file, or a save_to_disk directory")
    return _reader_for(path)(path)


def _reader_for(path: Path) -> Callable[[Path], list[RawRecord]]:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _read_saved_dataset
        raise LorakitError(f"{path} is a directory but not one written by datasets' save_to_disk (no dataset_info.json / state.json)")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise LorakitError(f"cannot tell the format of {path.name!r} from its suffix; use one of {', '.join(SUFFIXES)}")
    return {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[kind]


def _read_jsonl(path: Path) -> list[RawRecord]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                records.append(RawRecord(where, json.loads(line)))
            except json.JSONDecodeError as err:
                records.append(RawRecord(where, line, error=f"invalid JSON ({err.msg} at column {err.colno})"))
    return records


def _read_json(path: Path) -> list[RawRecord]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise LorakitError(f"{path.name}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} or {"train": [...]}
    if not isinstance(data, list):
        raise LorakitError(f"{path.name}: a .json data file must hold a list of records (got {type(data).__name__}); for one record per line use .jsonl")
    return [RawRecord(f"{path.name} record {index}", item) for index, item in enumerate(data)]


def _read_csv(path: Path) -> list[RawRecord]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        records = []
        for row in reader:
            # line_num counts physical lines read so far, so it is the row's last line (1-based);
            # a quoted field spanning lines makes the first line smaller, which is rare enough.
            where = f"{path.name}:{reader.line_num}"
            extra = row.pop(None, None)  # more fields than the header has
            error = f"{len(extra)} more field(s) than the header's {len(reader.fieldnames or [])}" if extra else None
            records.append(RawRecord(where, {k: v for k, v in row.items() if v is not None}, error=error))
    return records


def _read_parquet(path: Path) -> list[RawRecord]:
    # pyarrow (what datasets reads parquet with) straight to Python: datasets' from_parquet would
    # copy the file into its cache under ~/.cache/huggingface and draw a progress bar.
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses on a damaged file
        raise LorakitError(f"{path.name}: cannot read as parquet: {err}") from None
    return [RawRecord(f"{path.name} record {index}", row) for index, row in enumerate(rows)]


def _read_saved_dataset(path: Path) -> list[RawRecord]:
    from datasets import Dataset, DatasetDict, load_from_disk

    loaded = load_from_disk(str(path), keep_in_memory=True)
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise LorakitError(f"{path} holds splits {', '.join(loaded)} but no 'train'; point at one split's directory")
        loaded = loaded["train"]
    assert isinstance(loaded, Dataset)
    return [RawRecord(f"{path.name} record {index}", row) for index, row in enumerate(loaded)]
