"""Helpers shared by the data tests (the default tokenizer fixture lives in tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _write_jsonl(path: Path, records: list) -> Path:
    """One line per record: dicts as JSON, strings written as they are (to make bad lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def write_jsonl():
    return _write_jsonl
