"""`lorakit inspect` end to end, through the CLI's entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.cli import main


@pytest.fixture
def tiny_dir(tmp_path: Path, tiny_llama: torch.nn.Module) -> Path:
    tiny_llama.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_inspect_default_prints_the_report(capsys: pytest.CaptureFixture, default_model_dir: Path) -> None:
    code, out, err = run(capsys, "default", "--r", "16", "--forward")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "LlamaForCausalLM: linear layers (* = adapted)"
    assert "  * q_proj           weight [576, 576]     x30" in lines
    assert "    gate_proj        weight [1536, 576]    x30" in lines
    assert "trainable params: 1,843,200 || all params: 136,358,208 || trainable%: 1.3517" in lines
    assert lines[-1].startswith("forward pass: logits [1, ") and "max |adapted - base| = 0 " in lines[-1]


def test_inspect_a_local_directory(capsys: pytest.CaptureFixture, tiny_dir: Path) -> None:
    code, out, err = run(capsys, str(tiny_dir), "--r", "4", "--target-modules", "all-linear")
    assert code == 0, err
    assert out.splitlines()[-1] == "trainable params: 8,192 || all params: 98,624 || trainable%: 8.3063"
    assert "  * down_proj" in out and "    lm_head" in out


def test_inspect_takes_a_regex(capsys: pytest.CaptureFixture, tiny_dir: Path) -> None:
    code, out, err = run(capsys, str(tiny_dir), "--r", "4", "--target-modules", r".*layers\.0\.self_attn\.q_proj")
    assert code == 0, err
    assert out.splitlines()[-1] == "trainable params: 512 || all params: 90,944 || trainable%: 0.5630"


def one_line_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lorakit inspect: error: ")
    return lines[0]


def test_a_bad_target_is_a_one_line_error(capsys: pytest.CaptureFixture, tiny_dir: Path) -> None:
    line = one_line_error(capsys, str(tiny_dir), "--target-modules", "q_prj", "vproj")
    assert "target_modules ['q_prj', 'vproj'] match no module of the model (closest existing: " in line
    assert "q_proj" in line


def test_bad_values_are_reported_together(capsys: pytest.CaptureFixture, tiny_dir: Path) -> None:
    line = one_line_error(capsys, str(tiny_dir), "--r", "0", "--bias", "some")
    assert "r must be a positive integer (got 0)" in line and "bias must be one of none, all, lora_only" in line


def test_a_missing_model_is_a_one_line_error(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    line = one_line_error(capsys, str(tmp_path / "nowhere"))
    assert "is not a local directory" in line
