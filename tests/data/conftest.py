"""The default model's tokenizer (loads in a second or two), shared by the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from lorakit import load_tokenizer

    return load_tokenizer("default")


def _write_jsonl(path: Path, records: list) -> Path:
    """One line per record: dicts as JSON, strings written as they are (to make bad lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def write_jsonl():
    return _write_jsonl
