"""What a training run writes around its adapter: the output directory check (a file there is refused
before anything loads), lorakit_config.yaml (what load_run_config reads back) and summary.json (atomic)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import yaml

from lorakit.errors import LorakitError
from lorakit.train.config import RunConfig, load_run_config
from lorakit.train.loop import TrainResult
from lorakit.train.outputs import check_output_dir, write_run_config, write_summary


def config_for(output_dir) -> RunConfig:
    config = RunConfig()
    return dataclasses.replace(config, train=dataclasses.replace(config.train, output_dir=str(output_dir)))


RESULT = TrainResult(steps=12, final_loss=1.25, eval_loss=None, tokens_per_second=1234.6)


# --- check_output_dir -----------------------------------------------------------------------------------

def test_a_new_output_dir_is_accepted_and_not_created(tmp_path):
    out = tmp_path / "runs" / "first"
    assert check_output_dir(config_for(out)) == out
    assert not out.exists()  # nothing is written by the check


def test_an_existing_directory_is_accepted_even_with_files(tmp_path):
    """A run may resume from the checkpoints in its own output_dir, so files there are not refused."""
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert check_output_dir(config_for(tmp_path)) == tmp_path


def test_a_file_where_the_directory_should_be_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a directory")
    with pytest.raises(LorakitError, match=f"{target}.*is a file") as caught:
        check_output_dir(config_for(target))
    assert "\n" not in str(caught.value)
    assert target.read_text() == "not a directory"


# --- write_run_config -------------------------------------------------------------------------------------

def test_run_config_is_written_and_reads_back(tmp_path):
    out = tmp_path / "a" / "b"
    config = config_for(out)
    write_run_config(out, config)
    path = out / "lorakit_config.yaml"
    assert yaml.safe_load(path.read_text()) == config.to_dict()
    assert load_run_config(path) == config
    assert list(out.iterdir()) == [path]  # no staging file left beside it


def test_run_config_keeps_the_section_order(tmp_path):
    write_run_config(tmp_path, config_for(tmp_path))
    sections = [line.rstrip(":") for line in (tmp_path / "lorakit_config.yaml").read_text().splitlines() if not line.startswith(" ")]
    assert sections == list(RunConfig().to_dict())


# --- write_summary --------------------------------------------------------------------------------------

def test_summary_is_written_as_json_and_logged(tmp_path):
    summary = {"final_loss": 1.25, "steps": 12, "table": [{"model": "base", "score": 0.5}]}
    lines = []
    returned = write_summary(tmp_path, summary, RESULT, lines.append)
    assert returned is summary
    text = (tmp_path / "summary.json").read_text()
    assert json.loads(text) == summary and text.endswith("\n")
    assert len(lines) == 1
    line = lines[0]
    assert str(tmp_path / "adapter") in line and str(tmp_path / "metrics.jsonl") in line and str(tmp_path / "loss.png") in line
    assert "12 steps" in line and "1235 tokens/s" in line  # tokens/s rounded to a whole number
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_new_summary_replaces_the_old_one_whole(tmp_path):
    write_summary(tmp_path, {"notes": "x" * 500}, RESULT, lambda _: None)
    write_summary(tmp_path, {"steps": 1}, RESULT, lambda _: None)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 1}


def test_a_failed_write_keeps_the_old_summary_and_leaves_no_partial_file(tmp_path, monkeypatch):
    write_summary(tmp_path, {"steps": 1}, RESULT, lambda _: None)
    before = (tmp_path / "summary.json").read_text()

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)  # the file is staged, then the rename fails
    lines = []
    with pytest.raises(OSError, match="disk gone"):
        write_summary(tmp_path, {"steps": 2, "more": list(range(50))}, RESULT, lines.append)
    monkeypatch.undo()
    assert (tmp_path / "summary.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # the staged copy is removed
    assert lines == []  # no closing line for a summary that was not written


def test_a_summary_that_is_not_json_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_summary(tmp_path, {"bad": object()}, RESULT, lambda _: None)
    assert list(tmp_path.iterdir()) == []
