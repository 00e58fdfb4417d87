"""Data-parallel training under torchrun (gloo on the CPU): 2 processes x batch b == 1 process x batch 2b,
FSDP2 of the frozen base, a killed rank, resume under torchrun and on another number of processes, two
"nodes" over the loopback address; plus the layout arithmetic, sharding and errors without processes.

Every torchrun run here is a few seconds (two processes importing torch and transformers on two cores)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.data import IGNORE_INDEX
from lorakit.errors import LorakitError
from lorakit.train import distributed
from lorakit.train.attention import packed_attention_active
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.distributed import Layout, Replicas, plan_layout, resume_layout
from lorakit.train.fused import lean_blocks_active
from lorakit.train.step import checkpoint_kwargs, training_paths
from tests.helpers import make_tiny_llama
from tests.train import dist_worker

WORKER = str(Path(dist_worker.__file__))
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def two_processes(out: Path, *worker_args: str) -> subprocess.CompletedProcess:
    return torchrun("--standalone", "--nproc_per_node", "2", WORKER, str(out), *worker_args)


def losses(out: Path) -> list[float]:
    return json.loads((out / "result.json").read_text())["losses"]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def run_in_process(out: Path, *worker_args: str, log=print):
    return dist_worker.run(dist_worker.parse([str(out), *worker_args]), log=log)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The reference runs: 1 process x batch 4, and 2 processes x batch 2 (accumulation 2, 6 steps)."""
    root = tmp_path_factory.mktemp("dist")
    run_in_process(root / "one", "--batch", "4", log=lambda *_: None)
    done = two_processes(root / "two", "--batch", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"one": root / "one", "two": root / "two"}


def test_two_processes_with_batch_b_match_one_process_with_batch_2b(runs):
    torch.testing.assert_close(losses(runs["two"]), losses(runs["one"]), rtol=1e-5, atol=1e-6)
    assert_same_adapter(adapter(runs["two"]), adapter(runs["one"]))
    assert json.loads((runs["two"] / "result.json").read_text())["world_size"] == 2


def test_only_rank_0_writes(runs):
    metrics = (runs["two"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4, 5, 6]  # one writer, no duplicates
    state = json.loads((list_checkpoints(runs["two"])[0] / "trainer_state.json").read_text())
    assert (state["world_size"], state["micro_batch_rows"], state["global_batch_rows"]) == (2, 4, 8)


def test_fsdp_sharded_base_trains_as_the_replicated_one(runs, tmp_path):
    done = two_processes(tmp_path, "--batch", "2", "--fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(losses(tmp_path), losses(runs["two"]), rtol=1e-5, atol=1e-6)
    assert_same_adapter(adapter(tmp_path), adapter(runs["two"]))


def test_a_killed_rank_stops_the_job_and_the_run_resumes_under_torchrun(runs, tmp_path):
    killed = two_processes(tmp_path, "--batch", "2", "--kill-rank", "1", "--kill-step", "3")
    assert killed.returncode != 0
    assert "rank" in killed.stderr and "1 (local_rank: 1)" in killed.stderr and "Signal 9" in killed.stderr
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]  # complete, nothing half-written
    assert not (tmp_path / "adapter").exists()

    resumed = two_processes(tmp_path, "--batch", "2", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    torch.testing.assert_close(losses(tmp_path), losses(runs["two"])[2:], rtol=1e-5, atol=1e-6)
    assert_same_adapter(adapter(tmp_path), adapter(runs["two"]))


def test_a_two_process_checkpoint_resumes_on_one_process(runs, tmp_path):
    logged: list[str] = []
    checkpoint = list_checkpoints(runs["two"])[0]  # step 2, written by 2 processes x batch 2 x accumulation 2
    result = run_in_process(tmp_path, "--batch", "2", "--resume", str(checkpoint), log=logged.append)
    assert any("gradient_accumulation_steps 2 -> 4 keeps the global batch at 8 rows" in line for line in logged), logged
    torch.testing.assert_close(result.losses, losses(runs["two"])[2:], rtol=1e-5, atol=1e-6)
    assert_same_adapter(adapter(tmp_path), adapter(runs["two"]))


def test_two_nodes_over_the_loopback_address(runs, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
              "--rdzv-id", "lorakit-test", WORKER, str(tmp_path), "--batch", "2"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--node_rank", str(rank), *common], env=ENV,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    torch.testing.assert_close(losses(tmp_path), losses(runs["two"]), rtol=1e-5, atol=1e-6)


# --- without processes --------------------------------------------------------------------------------


def test_layout_from_a_global_batch():
    assert plan_layout(2, 1, 16, world_size=4) == Layout(4, 8, 2)
    assert plan_layout(2, 3, 0, world_size=2) == Layout(2, 4, 3)
    with pytest.raises(LorakitError, match="global_batch_size 10 is not divisible by 4 process"):
        plan_layout(1, 1, 10, world_size=4)


def test_resume_layout_keeps_the_global_batch():
    saved = Layout(2, 4, 2).record()  # 2 processes x 2 rows, accumulation 2: 8 rows per step
    notices: list[str] = []
    layout, position = resume_layout(saved, Layout(1, 2, 2), batch_in_epoch=4, log=notices.append)
    assert (layout, position) == (Layout(1, 2, 4), 8) and len(notices) == 1
    assert resume_layout(saved, Layout(2, 4, 7), 4, notices.append) == (Layout(2, 4, 2), 4)  # same processes
    with pytest.raises(LorakitError, match="does not split into micro-batches of 3 process"):
        resume_layout(saved, Layout(3, 6, 1), 4, notices.append)
    assert resume_layout({"total_steps": 6}, Layout(1, 2, 2), 5, notices.append) == (Layout(1, 2, 2), 5)  # older checkpoints


def test_shards_cover_the_batch_and_an_empty_shard_adds_no_labels():
    batch = {"input_ids": torch.arange(12).view(3, 4), "labels": torch.arange(12).view(3, 4), "seq_lens": [[4], [4], [4]], "padding": [0, 0, 0]}
    shards = [Replicas(rank, 2).shard(batch) for rank in (0, 1)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])
    one = {k: v[:1] for k, v in batch.items()}
    empty = Replicas(0, 2).shard(one)  # the one row goes to rank 1
    assert (empty["labels"] == IGNORE_INDEX).all() and empty["padding"] == [4]


def test_an_unavailable_backend_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(distributed.dist, "is_nccl_available", lambda: False)
    with pytest.raises(LorakitError, match="backend 'nccl' is not available"):
        distributed.pick_backend("cuda")
    assert distributed.pick_backend("cpu") == "gloo"


def test_the_process_group_is_left_after_a_barrier_only_when_the_block_ends_normally(monkeypatch):
    """A rank that left early made another abort at exit; after an error the others may be gone, so no barrier."""
    calls: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: "destroy" not in calls)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    with distributed.leaving_process_group():
        calls.append("train")
    assert calls == ["train", "barrier", "destroy"]
    calls.clear()
    with pytest.raises(RuntimeError, match="rank 1 died"), distributed.leaving_process_group():
        raise RuntimeError("rank 1 died")
    assert calls == ["destroy"]


def test_checkpoint_recompute_takes_the_training_paths_on_another_thread():
    """On CUDA autograd recomputes checkpointed layers on its own threads; context_fn enters the paths there."""
    hf_model = make_tiny_llama()
    seen: list[tuple[bool, bool]] = []

    def backward_thread() -> None:
        seen.append((packed_attention_active(), lean_blocks_active()))
        _, recompute = checkpoint_kwargs(hf_model)["context_fn"]()
        with recompute:
            seen.append((packed_attention_active(), lean_blocks_active()))

    with training_paths(hf_model):
        thread = threading.Thread(target=backward_thread)
        thread.start()
        thread.join()
    assert seen == [(False, False), (True, True)]


def test_nproc_is_taken_out_of_the_settings(monkeypatch, tmp_path):
    from lorakit.cli import main

    launched: list = []
    monkeypatch.setattr(distributed, "launch", lambda n, args: launched.append((n, args)) or 0)
    assert main(["train", "--max_steps", "3", "--nproc", "2", "--output_dir", str(tmp_path)]) == 0
    assert launched == [(2, ["train", "--max_steps", "3", "--output_dir", str(tmp_path)])]
    assert main(["train", "--nproc", "zero"]) == 2
