"""The workbench over HTTP: its page and files, its runs routes confined to --runs-root, and the API key
and adapter-root rules on every call the page makes (tests/serve/test_workbench_browser.py drives the page).

The servers run a tiny random Llama with the default model's tokenizer: real text in and out, in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx2")

KEY = "workbench-key-123"
BASE = "tiny-llama"
RECORDS = [{"step": 1, "lr": 1e-4, "tokens_seen": 64, "loss": 3.0, "tokens_per_second": 100.0},
           {"step": 2, "lr": 2e-4, "tokens_seen": 128, "loss": 2.5, "tokens_per_second": 110.0},
           {"step": 2, "eval_loss": 2.7, "eval_perplexity": 14.9}]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with the default model's tokenizer and chat template, saved as a model directory."""
    import torch
    from transformers import LlamaForCausalLM

    from lorakit import load_tokenizer
    from tests.helpers import tiny_llama_config

    directory = tmp_path_factory.mktemp("models") / BASE
    tokenizer = load_tokenizer("default")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapter_root(tiny_model_dir, tmp_path_factory) -> Path:
    """Three random adapters that change greedy answers ("one" is served from the start), a symlink out of the root."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]), "default")
    generator = torch.Generator().manual_seed(1)
    for name in ("one", "two", "three"):
        with torch.no_grad():
            for pname, param in lora.named_parameters():
                if "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=generator))
        lora.save_pretrained(root / name)
    outside = tmp_path_factory.mktemp("elsewhere")
    (root / "three").rename(outside / "three")
    (root / "link").symlink_to(outside / "three", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """Runs at two depths, a metrics.jsonl being appended (partial last line), links out, a FIFO, no metrics."""
    root = tmp_path_factory.mktemp("runs")
    outside = tmp_path_factory.mktemp("outside-runs")
    lines = "".join(json.dumps(r) + "\n" for r in RECORDS)
    for run in (root / "run-a", root / "group" / "run-b", outside / "secret"):
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(lines)
    (root / "group" / "run-b" / "metrics.jsonl").write_text(lines + '{"step": 3, "lo')  # training is writing this line
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)
    (root / "linked-file").mkdir()
    (root / "linked-file" / "metrics.jsonl").symlink_to(outside / "secret" / "metrics.jsonl")
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "metrics.jsonl")
    (root / "empty").mkdir()
    for skipped in ("run-a/checkpoints/step-000001", ".hidden"):
        (root / skipped).mkdir(parents=True)
        (root / skipped / "metrics.jsonl").write_text(lines)
    return root


def start_server(model_dir: Path, *flags: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "serve", "--model", str(model_dir), "--port", str(port),
                             "--max-batch", "8", "--max-model-len", "512", "--no-compile", "--dtype", "float32", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("the server did not start within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def workbench_server(tiny_model_dir, adapter_root, runs_root):
    """A server with an API key, an adapter root, a runs root, and adapter "one" loaded."""
    url, proc = start_server(tiny_model_dir, "--api-key", KEY, "--adapter", f"one={adapter_root / 'one'}",
                             "--adapter-root", str(adapter_root), "--runs-root", str(runs_root))
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def bare_server(tiny_model_dir):
    """No key, no adapter root, no runs root."""
    url, proc = start_server(tiny_model_dir)
    yield url
    stop_server(proc)


def call(url: str, method: str, path: str, body=None, key: str | None = KEY, timeout: float = 30):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is None:
        return httpx.request(method, url + path, headers=headers, timeout=timeout)
    return httpx.request(method, url + path, content=json.dumps(body), headers={**headers, "Content-Type": "application/json"},
                         timeout=timeout)


# --- the page -------------------------------------------------------------------------------------
def test_the_page_and_its_files_are_served_without_a_key(workbench_server) -> None:
    page = httpx.get(workbench_server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/workbench/app.js" in page.text and "/workbench/style.css" in page.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = httpx.get(f"{workbench_server}/workbench/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind) and len(response.text) > 500


def test_the_page_reaches_nothing_outside_the_server() -> None:
    """No network at run time: no URL in the page's files points anywhere but the server itself."""
    from importlib import resources

    static = resources.files("lorakit.serve").joinpath("static")
    for name in ("index.html", "app.js", "style.css"):
        text = static.joinpath(name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


@pytest.mark.parametrize("path", ["/workbench/nope.js", "/workbench/..%2f..%2fpyproject.toml", "/workbench/%2e%2e",
                                  "/workbench/__init__.py"])
def test_only_the_pages_own_files_are_served(workbench_server, path) -> None:
    assert httpx.get(workbench_server + path).status_code == 404


# --- the API key on everything the page does ------------------------------------------------------
PAGE_CALLS = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}),
    ("POST", "/v1/chat/completions", {"model": BASE, "adapters": {"one": 0.5}, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2}),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "two", "lora_path": "two"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "two"}),
    ("GET", "/v1/runs", None),
    ("GET", "/v1/runs/metrics?path=run-a", None),
]


@pytest.mark.parametrize("method, path, body", PAGE_CALLS)
def test_every_call_the_page_makes_needs_the_key(workbench_server, method, path, body) -> None:
    for key in (None, "wrong", KEY[:-1], KEY + "4"):
        response = call(workbench_server, method, path, body, key=key)
        assert response.status_code == 401, (key, response.text)
        assert response.json()["error"]["type"] == "authentication_error"
    response = call(workbench_server, method, path, body)
    assert response.status_code == 200, response.text


def test_without_a_key_on_the_server_the_page_needs_none(bare_server) -> None:
    assert call(bare_server, "GET", "/v1/models", key=None).json()["data"][0]["id"] == BASE
    answer = call(bare_server, "POST", "/v1/chat/completions", PAGE_CALLS[1][2], key=None)
    assert answer.status_code == 200 and answer.text.rstrip().endswith("data: [DONE]")


# --- adapter root ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, path, status", [("up", "../", 403), ("abs", "/etc", 403), ("link", "link", 403),
                                                ("missing", "nope", 404), ("bad name", "two", 400)])
def test_loading_stays_inside_the_adapter_root(workbench_server, name, path, status) -> None:
    response = call(workbench_server, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
    assert response.status_code == status, response.text
    models = {m["id"] for m in call(workbench_server, "GET", "/v1/models").json()["data"]}
    assert name not in models


def test_without_an_adapter_root_load_and_unload_are_off(bare_server) -> None:
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "one", "lora_path": "one"}), ("/v1/unload_lora_adapter", {"lora_name": "one"})):
        response = call(bare_server, "POST", path, body, key=None)
        assert response.status_code == 404 and "--adapter-root" in response.json()["error"]["message"]


# --- runs root ------------------------------------------------------------------------------------
def test_runs_lists_the_run_directories_under_the_root(workbench_server) -> None:
    listing = call(workbench_server, "GET", "/v1/runs").json()
    paths = {run["path"] for run in listing["runs"]}
    # not offered: a metrics.jsonl that is a link or a FIFO; not entered: links, a run's checkpoints, hidden dirs
    assert {"run-a", "group/run-b"} <= paths <= {"run-a", "group/run-b", "growing"}
    assert all(isinstance(run["updated"], float) for run in listing["runs"])


def test_a_runs_metrics_are_its_complete_records(workbench_server) -> None:
    run = call(workbench_server, "GET", "/v1/runs/metrics?path=run-a").json()
    assert run["records"] == RECORDS and run["path"] == "run-a"
    partial = call(workbench_server, "GET", "/v1/runs/metrics?path=group/run-b").json()
    assert partial["records"] == RECORDS  # the line still being written waits for the next poll


def test_a_run_growing_is_seen_on_the_next_poll(workbench_server, runs_root) -> None:
    run = runs_root / "growing"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    assert len(call(workbench_server, "GET", "/v1/runs/metrics?path=growing").json()["records"]) == 1
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(RECORDS[1]) + "\n")
    assert call(workbench_server, "GET", "/v1/runs/metrics?path=growing").json()["records"] == RECORDS[:2]


@pytest.mark.parametrize("path, status", [("../", 403), ("..", 403), ("/etc", 403), ("escape", 403), ("linked-file", 403),
                                          ("run-a/../../", 403), ("nope", 404), ("empty", 404), ("", 404), ("fifo", 400)])
def test_run_paths_stay_inside_the_runs_root(workbench_server, path, status) -> None:
    started = time.monotonic()
    response = call(workbench_server, "GET", f"/v1/runs/metrics?path={path}", timeout=10)
    assert time.monotonic() - started < 5  # a FIFO is refused, not waited on
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == "path"
    assert "secret" not in response.text and '"step"' not in response.text


def test_without_a_runs_root_the_runs_view_is_off(bare_server) -> None:
    for path in ("/v1/runs", "/v1/runs/metrics?path=run-a"):
        response = call(bare_server, "GET", path, key=None)
        assert response.status_code == 404 and "--runs-root" in response.json()["error"]["message"]


def test_a_runs_root_that_is_not_a_directory_is_one_line(tmp_path, capsys) -> None:
    from lorakit.cli import main

    assert main(["serve", "--runs-root", str(tmp_path / "missing"), "--no-compile"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--runs-root" in err and "is not a directory" in err and len(err.splitlines()) == 1
