"""Full fine-tuning (`lorakit train --full`) through the CLI on a tiny Llama saved with a character
tokenizer: the loss falls, every weight moves, the saved directory is what transformers loads (equal
logits), a resume is exact, the summary sits beside a LoRA run's, and bad combinations write nothing."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.train import full
from tests.helpers import char_tokenizer, make_tiny_llama

SHORT = ["--task_train_examples", "24", "--task_eval_examples", "2", "--per_device_train_batch_size", "2",
         "--learning_rate", "3e-3", "--warmup_steps", "1", "--logging_steps", "1", "--model.dtype", "float32"]


def save_tiny_model(directory: Path, **overrides) -> Path:
    model = make_tiny_llama(seed=3, max_position_embeddings=1024, eos_token_id=1, pad_token_id=0, bos_token_id=None, **overrides)
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory):
    """A LoRA run and a full run of the same task on the same base; the full run compared with the LoRA one.
    The full run's in-memory model is kept as it is saved, to check what transformers loads back."""
    root = tmp_path_factory.mktemp("runs")
    lora, full_out = root / "lora", root / "full"
    common = ["--model.name", str(base_dir), *SHORT, "--max_steps", "8"]
    assert main(["train", *common, "--save_steps", "4", "--output_dir", str(lora)]) == 0
    saved_models = []
    original = full.FullModel.save_pretrained
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(full.FullModel, "save_pretrained", lambda self, d: (saved_models.append(self.model), original(self, d))[1])
        with _captured() as printed:
            code = main(["train", "--full", *common, "--gradient_checkpointing", "true", "--compare_with", str(lora),
                         "--output_dir", str(full_out)])
    assert code == 0
    return {"lora": lora, "full": full_out, "model": saved_models[-1], "printed": printed}


@contextmanager
def _captured() -> Iterator[list[str]]:
    """The lines printed to stdout inside (the run logs with print), still shown."""
    lines: list[str] = []
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        yield lines
    lines += buffer.getvalue().splitlines()
    print(buffer.getvalue())


def test_the_loss_falls_and_every_weight_changes(runs, base_dir):
    records = [json.loads(line) for line in (runs["full"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8
    assert losses[-1] < 0.8 * losses[0]
    before, after = weights(base_dir), weights(runs["full"] / "model")
    assert set(after) == set(before)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []  # embeddings, norms and the head too, not only the linears


def test_the_saved_directory_is_a_transformers_model_with_equal_logits(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs["full"] / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth")]  # safetensors only
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.use_cache is True  # gradient checkpointing turned it off for training only
    trained = runs["model"].eval()
    ids = torch.tensor([[5, 40, 41, 12, 60, 70, 3, 9]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer.encode("qty: 5", add_special_tokens=False)) == "qty: 5"


def test_summary_has_the_lora_runs_shape_and_the_before_after_table(runs):
    full_summary = json.loads((runs["full"] / "summary.json").read_text())
    lora_summary = json.loads((runs["lora"] / "summary.json").read_text())
    assert set(full_summary) - {"model"} == set(lora_summary) - {"adapter"}
    assert full_summary["finetune"] == "full" and lora_summary["finetune"] == "lora"
    total = sum(p.numel() for p in make_tiny_llama().parameters())
    assert full_summary["trainable_parameters"] == total > 5 * lora_summary["trainable_parameters"]
    for summary in (full_summary, lora_summary):
        assert summary["peak_rss_mb"] > 50 and summary["train_seconds"] > 0 and summary["saved_bytes"] > 0
        assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert full_summary["before"] == pytest.approx(lora_summary["before"], rel=1e-3)  # the same base, scored alike
    assert full_summary["saved_bytes"] > 5 * lora_summary["saved_bytes"]  # the whole model, not an adapter
    printed = "\n".join(runs["printed"])
    assert "fine-tuned" in printed and "base model" in printed  # the before/after table
    assert f"model saved to {runs['full'] / 'model'}" in printed


def test_the_full_run_is_printed_beside_the_lora_run(runs):
    printed = runs["printed"]
    start = next(i for i, line in enumerate(printed) if line.startswith(f"compared with {runs['lora']}"))
    table = "\n".join(printed[start:])
    for row in ("trainable params", "peak RSS (MB)", "train time (s)", "tokens/s", "saved size (MB)", "exact match", "eval loss"):
        assert row in table, row
    assert "this run (full)" in table and "lora run" in table
    params_row = next(line for line in table.splitlines() if "trainable params" in line)
    full_summary = json.loads((runs["full"] / "summary.json").read_text())
    lora_summary = json.loads((runs["lora"] / "summary.json").read_text())
    ratio = full_summary["trainable_parameters"] / lora_summary["trainable_parameters"]
    assert params_row.split()[-1] == f"{ratio:.2f}x"


def test_a_resumed_full_run_ends_with_the_same_weights(tmp_path):
    """Tied embeddings too: the checkpoint writes the shared tensor once and loads it back into both."""
    base = save_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["train", "--full", "--model.name", str(base), *SHORT, "--max_steps", "6", "--compare_base", "false"]
    assert main([*args, "--save_steps", "3", "--output_dir", str(straight)]) == 0
    checkpoint = straight / "checkpoints" / "step-000003"
    assert {p.name for p in checkpoint.iterdir()} == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"}
    assert main([*args, "--resume_from_checkpoint", str(checkpoint), "--output_dir", str(resumed)]) == 0
    a, b = weights(straight / "model"), weights(resumed / "model")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], weights(base)["model.embed_tokens.weight"])


def test_a_lora_checkpoint_is_refused_by_a_full_run(runs, base_dir, tmp_path, capsys):
    checkpoint = runs["lora"] / "checkpoints" / "step-000004"
    code = main(["train", "--full", "--model.name", str(base_dir), *SHORT, "--max_steps", "8", "--compare_base", "false",
                 "--resume_from_checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "LoRA checkpoint" in err and "without --full" in err
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("extra, says", [
    (["--quantization", "nf4"], "nf4 base"),
    (["--quantization", "int8"], "int8 base"),
    (["--r", "4", "--target_modules", "q_proj"], "r, target_modules configure a LoRA adapter"),
    (["--use_dora", "true"], "use_dora configures a LoRA adapter"),
    (["--task_type", "SEQ_CLS"], "causal LMs only"),
    (["--fsdp", "true"], "drop fsdp"),
    (["--loraplus_lr_ratio", "16"], "LoRA+"),
    (["--nproc", "2"], "drop --nproc"),
])
def test_combinations_that_make_no_sense_exit_2_with_one_line_and_write_nothing(base_dir, tmp_path, capsys, extra, says):
    out = tmp_path / "out"
    assert main(["train", "--full", "--model.name", str(base_dir), *extra, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_finetune_takes_lora_or_full_and_compare_with_needs_a_summary(base_dir, tmp_path, capsys):
    assert main(["train", "--finetune", "half", "--output_dir", str(tmp_path / "a")]) == 2
    assert "finetune must be lora or full (got 'half')" in capsys.readouterr().err
    assert main(["train", "--full", "--compare_with", str(tmp_path), "--output_dir", str(tmp_path / "b")]) == 2
    assert "has no summary.json" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_yaml_finetune_full_is_the_same_as_the_flag(tmp_path):
    from lorakit.commands.train import parse_overrides
    from lorakit.train.config import load_run_config

    (tmp_path / "run.yaml").write_text("train:\n  finetune: full\n")
    assert load_run_config(tmp_path / "run.yaml").train.finetune == "full"
    assert parse_overrides(["--max_steps", "3", "--full"]) == {"max_steps": "3", "finetune": "full"}
    assert load_run_config().train.finetune == "lora"


def test_a_failed_save_leaves_no_half_written_model(base_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def full_disk(self, directory, *args, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("{")  # part of the directory is written, then the disk fills
        raise OSError("No space left on device")

    from lorakit.models.load import load_tokenizer

    monkeypatch.setattr(type(load_tokenizer(base_dir)), "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        main(["train", "--full", "--model.name", str(base_dir), *SHORT, "--max_steps", "2", "--compare_base", "false",
              "--output_dir", str(out)])
    assert not (out / "model").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".model")]  # no staging directory left behind
    assert not (out / "summary.json").exists()


def test_ctrl_c_checkpoints_the_full_model_and_latest_resumes_it_exactly(base_dir, tmp_path, monkeypatch):
    from lorakit.train import loop

    args = ["train", "--full", "--model.name", str(base_dir), *SHORT, "--max_steps", "5", "--compare_base", "false"]
    assert main([*args, "--output_dir", str(tmp_path / "straight")]) == 0
    calls, real_step = [], loop.train_step

    def interrupted_third_step(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(loop, "train_step", interrupted_third_step)
        assert main([*args, "--output_dir", str(out)]) == 0
    assert not (out / "model").exists() and not (out / "summary.json").exists()  # no final model from a stopped run
    assert (out / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    assert main([*args, "--resume_from_checkpoint", "latest", "--output_dir", str(out)]) == 0
    a, b = weights(tmp_path / "straight" / "model"), weights(out / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
