"""report_to: tensorboard: the event files, read back with TensorBoard's own reader, hold metrics.jsonl's scalars."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.errors import ConfigError, LorakitError
from lorakit.train import loop
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.config import load_run_config
from lorakit.train.metrics import read_metrics
from lorakit.train.tensorboard import open_metrics, tag
from tests.helpers import make_tiny_llama
from tests.train.test_loop import QUIET, _cfg, _rows


def tiny_lora():
    from lorakit import LoraConfig, get_peft_model

    return get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files, by tag, as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(out / "metrics.jsonl"):
        for key, value in record.items():
            if key != "step":
                found.setdefault(tag(key), []).append((record["step"], value))
    return found


def assert_same(events: dict, wanted: dict) -> None:
    assert set(events) == set(wanted)
    for name, points in wanted.items():
        assert [s for s, _ in events[name]] == [s for s, _ in points], name
        assert [v for _, v in events[name]] == pytest.approx([v for _, v in points], rel=1e-6), name  # stored as float32


def test_the_events_hold_every_scalar_of_metrics_jsonl(tmp_path) -> None:
    rows = _rows(8)
    loop.train(tiny_lora(), rows, rows[:4], _cfg(tmp_path, max_steps=6, save_steps=0, eval_steps=3, report_to="tensorboard"), **QUIET)
    events = scalars(tmp_path / "runs")
    assert {"train/loss", "train/lr", "train/tokens_seen", "train/tokens_per_second", "eval/loss", "eval/perplexity"} <= set(events)
    assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4, 5, 6] and [s for s, _ in events["eval/loss"]] == [3, 6]
    assert_same(events, expected(tmp_path))


def test_none_writes_no_events(tmp_path) -> None:
    loop.train(tiny_lora(), _rows(8), [], _cfg(tmp_path, max_steps=2, save_steps=0), **QUIET)
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "runs").exists()


def test_a_resumed_run_hides_the_events_after_its_checkpoint(tmp_path) -> None:
    """Resumed from step 2 of a finished 6-step run: as metrics.jsonl drops the records after step 2,
    TensorBoard purges the old events of steps 3-6, leaving each step once, with the new run's values."""
    rows = _rows()
    loop.train(tiny_lora(), rows, [], _cfg(tmp_path, save_steps=2, report_to="tensorboard"), **QUIET)
    assert [s for s, _ in scalars(tmp_path / "runs")["train/loss"]] == [1, 2, 3, 4, 5, 6]
    step_2 = list_checkpoints(tmp_path)[0]
    assert step_2.name.endswith("000002")
    loop.train(tiny_lora(), rows, [], _cfg(tmp_path, save_steps=2, report_to="tensorboard", resume_from_checkpoint=str(step_2)), **QUIET)
    events = scalars(tmp_path / "runs")
    assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert_same(events, expected(tmp_path))


def test_report_to_is_checked_with_the_other_settings(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="report_to must be none or tensorboard"):
        load_run_config(overrides={"report_to": "wandb"})
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ConfigError, match=r"pip install tensorboard"):
        load_run_config(overrides={"report_to": "tensorboard"})
    assert load_run_config(overrides={"report_to": "none"}).train.report_to == "none"


def test_a_missing_package_is_one_line_naming_the_install(tmp_path, monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith(("tensorboard.", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(LorakitError, match=r"^report_to: tensorboard needs the tensorboard package; pip install tensorboard") as error:
        open_metrics(tmp_path, "tensorboard")
    assert "\n" not in str(error.value)


def test_importing_training_does_not_import_tensorboard() -> None:
    """Start-up time is unchanged by the option: the writer (~2 s of imports) loads only when a run asks for it."""
    code = "import sys, lorakit.train.loop, lorakit.train.config; print(any(m.startswith('tensorboard') or m == 'torch.utils.tensorboard' for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
