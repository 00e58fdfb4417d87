"""`lorakit serve` as a real process, driven with the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

pytestmark = pytest.mark.slow
KEY = "test-key-123"
BASE = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, default_model_dir) -> Path:
    """Two small random adapters on the default model, plus one outside the root."""
    import torch

    from lorakit import LoraConfig, get_peft_model, load_model

    root = tmp_path_factory.mktemp("adapters")
    model = load_model(default_model_dir)
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), "default")
    for name in ("one", "two", "three"):
        with torch.no_grad():
            for pname, param in lora.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, 0.5)
        lora.save_pretrained(root / name)
    outside = tmp_path_factory.mktemp("elsewhere") / "three"
    (root / "three").rename(outside)
    (root / "link").symlink_to(outside, target_is_directory=True)  # a symlink out of the root
    return root


@pytest.fixture(scope="module")
def server(adapter_root):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit.cli", "serve", "--adapter", f"one={adapter_root / 'one'}", "--adapter-root",
         str(adapter_root), "--port", str(port), "--api-key", KEY, "--max-batch", "8", "--max-model-len", "512",
         "--no-compile"],  # compiling would add 10-60 s to start-up; the compiled path has tests of its own
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
    yield url, proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def post(server, path: str, body, key: str | None = KEY, timeout: float = 60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server[0] + path, content=data, headers={**headers, "Content-Type": "application/json"}, timeout=timeout)


def test_models_lists_the_base_and_adapters(client, adapter_root) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, "one"}
    assert models["one"].parent == BASE and models["one"].root == str((adapter_root / "one").resolve())


def test_chat_and_completions_answer_with_usage(client) -> None:
    chat = client.chat.completions.create(model="one", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.completion_tokens <= 6 and chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    text = client.completions.create(model=BASE, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 5


def test_the_adapter_changes_the_answer_and_a_mix_is_served(client) -> None:
    ask = dict(messages=[{"role": "user", "content": "Name three colors."}], max_tokens=12, temperature=0)
    base = client.chat.completions.create(model=BASE, **ask).choices[0].message.content
    one = client.chat.completions.create(model="one", **ask).choices[0].message.content
    half = client.chat.completions.create(model=BASE, extra_body={"adapters": {"one": 1.0}}, **ask).choices[0].message.content
    assert one != base and half == one


def test_streaming_matches_the_whole_answer(client) -> None:
    ask = dict(model="one", messages=[{"role": "user", "content": "Count to five."}], max_tokens=10, temperature=0)
    client.chat.completions.create(**ask)  # the prompt's blocks into the prefix cache: both runs below start from them
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ask))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = list(client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
    assert streamed[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, status, words", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"model": "one", "messages": [{"role": "user", "content": "x"}], "temperature": -0.5}, 400, "temperature"),
    ({"model": "one", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
    ({"model": "one", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ({"model": "one", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "one", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "context"),
    ({"model": "one", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, 400, "integer"),
    ({"model": "one", "messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "one", "messages": [{"role": "user", "content": "word " * 600}]}, 400, "context"),
    ({"model": BASE, "prompt": "x", "adapters": {"ghost": 1.0}}, 404, "ghost"),
])
def test_bad_requests_get_openai_errors(server, body, status, words) -> None:
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    response = post(server, path, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and {"type", "param", "code"} <= set(error)


@pytest.mark.parametrize("weight", [1e38, float("inf"), float("nan"), -1e9])
def test_an_adapter_weight_beyond_the_bound_gets_a_400_naming_adapters(server, weight) -> None:
    body = {"model": BASE, "prompt": "x", "max_tokens": 2, "adapters": {"one": weight}}
    response = post(server, "/v1/completions", body)  # json.dumps writes inf / nan as Infinity / NaN tokens
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "adapters" and "'one'" in error["message"] and "-100 to 100" in error["message"]


@pytest.mark.parametrize("weight", [0.5, -0.5])
def test_an_adapter_weight_within_the_bound_is_served(server, weight) -> None:
    body = {"model": BASE, "prompt": "x", "max_tokens": 2, "adapters": {"one": weight}}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_an_integer_over_pythons_digit_limit_is_a_400_not_a_crash(server) -> None:
    body = b'{"model": "one", "prompt": "x", "adapters": {"one": ' + b"1" * 5000 + b"}}"
    response = post(server, "/v1/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "body"


def test_malformed_json_oversized_bodies_and_keys(server) -> None:
    assert post(server, "/v1/chat/completions", b"{not json").status_code == 400
    assert post(server, "/v1/chat/completions", b"x" * (2 << 20)).status_code == 413
    assert post(server, "/v1/chat/completions", {"model": "one"}, key=None).status_code == 401
    wrong = post(server, "/v1/chat/completions", {"model": "one"}, key="wrong")
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server[0] + "/health").status_code == 200  # health needs no key


def test_load_and_unload_stay_inside_the_adapter_root(server, client, adapter_root) -> None:
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "two", "lora_path": "two"}).status_code == 200
    assert "two" in {m.id for m in client.models.list().data}
    assert client.chat.completions.create(model="two", messages=[{"role": "user", "content": "hi"}], max_tokens=3).choices
    for name, path in (("up", "../"), ("abs", "/etc"), ("link", "link"), ("bad name", "two"), ("x/y", "two")):
        response = post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        assert response.status_code in (400, 403, 404), (name, path, response.text)
    before = {m.id for m in client.models.list().data}
    (adapter_root / "broken").mkdir(exist_ok=True)
    (adapter_root / "broken" / "adapter_config.json").write_text("{}")
    (adapter_root / "broken" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": "broken"}).status_code == 400
    assert {m.id for m in client.models.list().data} == before  # a failed load leaves the served set unchanged
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "two"}).status_code == 200
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "two"}).status_code == 404


@pytest.mark.parametrize("fifo", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_fifo_in_the_adapter_root_is_refused_at_once_and_serving_goes_on(server, client, adapter_root, fifo) -> None:
    """Reading a FIFO waits for a writer: a load reaching it would hang its request (and, holding the
    registry's lock, every other client's). It is a 400 naming the file within seconds instead."""
    directory = adapter_root / f"fifo-{fifo.split('.')[0]}"
    directory.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if name == fifo:
            os.mkfifo(directory / name)
        else:
            (directory / name).write_bytes((adapter_root / "two" / name).read_bytes())
    started = time.monotonic()
    response = post(server, "/v1/load_lora_adapter", {"lora_name": directory.name, "lora_path": directory.name}, timeout=10)
    assert time.monotonic() - started < 5
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "lora_path" and fifo in error["message"] and "not a regular file (a FIFO)" in error["message"]
    answer = client.completions.create(model=BASE, prompt="The sky is", max_tokens=3, temperature=0, timeout=30)
    assert answer.usage.completion_tokens == 3
    assert directory.name not in {m.id for m in client.models.list().data}


def test_an_adapter_file_linked_out_of_the_root_is_refused(server, adapter_root, tmp_path) -> None:
    directory = adapter_root / "linked-file"
    directory.mkdir()
    (directory / "adapter_config.json").write_bytes((adapter_root / "two" / "adapter_config.json").read_bytes())
    outside = tmp_path / "adapter_model.safetensors"
    outside.write_bytes((adapter_root / "two" / "adapter_model.safetensors").read_bytes())
    (directory / "adapter_model.safetensors").symlink_to(outside)
    response = post(server, "/v1/load_lora_adapter", {"lora_name": "linked-file", "lora_path": "linked-file"}, timeout=10)
    assert response.status_code == 403 and "adapter_model.safetensors" in response.json()["error"]["message"]


def test_a_bad_request_does_not_disturb_the_others(server, client) -> None:
    """Bad requests among good ones: each good one completes in full, and the server answers as before.
    (Not "the same text as alone": in the default mode bf16 results depend on the batch's shape.)"""
    from concurrent.futures import ThreadPoolExecutor

    ask = dict(model="one", messages=[{"role": "user", "content": "List fruits."}], max_tokens=8, temperature=0)
    client.chat.completions.create(**ask)  # leaves the prompt's blocks in the prefix cache, as the later runs find them
    before = client.chat.completions.create(**ask).choices[0].message.content
    with ThreadPoolExecutor(6) as pool:
        good = [pool.submit(client.chat.completions.create, **ask) for _ in range(4)]
        bad = [pool.submit(post, server, "/v1/chat/completions", {**ask, "temperature": -1}) for _ in range(2)]
        assert all(b.result().status_code == 400 for b in bad)
        for g in good:
            answer = g.result()
            assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 8
    assert client.chat.completions.create(**ask).choices[0].message.content == before


def test_a_client_that_disconnects_frees_its_slot(server) -> None:
    body = {"model": "one", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        next(response.iter_lines())  # the first chunk arrived: the request is running
    deadline = time.time() + 20
    while time.time() < deadline:
        if running_requests(server[0]) == 0:
            return
        time.sleep(0.2)
    pytest.fail(f"the disconnected request still holds its slot: {running_requests(server[0])} running")


def running_requests(url: str) -> float:
    lines = [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith("lorakit_requests_running")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_metrics_count_requests_and_tokens(server) -> None:
    text = httpx.get(server[0] + "/metrics").text
    for name in ("lorakit_requests_total", "lorakit_generation_tokens_total", "lorakit_request_latency_seconds_bucket",
                 "lorakit_requests_waiting", "lorakit_adapters_loaded"):
        assert name in text
    assert 'lorakit_requests_total{endpoint="chat",status="400"}' in text


def test_sigterm_finishes_in_flight_requests_and_exits_zero(server, client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url, proc = server
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.chat.completions.create, model="one", max_tokens=100, temperature=0,
                              messages=[{"role": "user", "content": "Tell me a story."}], extra_body={"ignore_eos": True})
        deadline = time.time() + 30
        while running_requests(url) < 1 and time.time() < deadline:  # signal only once the request is in flight
            time.sleep(0.02)
        assert not pending.done(), "the request ended before the signal: nothing was in flight"
        proc.send_signal(signal.SIGTERM)
        assert pending.result().choices[0].finish_reason == "length"
    assert proc.wait(timeout=60) == 0


@pytest.mark.parametrize("flag, message", [("--prefix-cache-mb", "--prefix-cache-mb must be >= 0"),
                                           ("--stream-interval", "--stream-interval must be >= 0 milliseconds")])
def test_a_negative_size_is_refused_in_one_line(flag: str, message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "serve", flag, "-1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_event_relay_sends_a_started_streams_text_in_fewer_larger_bursts() -> None:
    import asyncio

    from lorakit.serve.app import EventRelay

    async def run(interval: float) -> tuple[list[object], int]:
        relay, queue = EventRelay(interval), asyncio.Queue()
        post, wakeups = relay.listener(queue), 0
        deliver = relay._deliver

        def counted() -> None:
            nonlocal wakeups
            wakeups += 1
            deliver()

        relay._deliver = counted
        post("first")  # goes at once
        await asyncio.sleep(0.01)
        for piece in ("a", "b", "c"):  # within the interval: wait for the next events
            post(piece)
            await asyncio.sleep(0.01)
        post(None)  # the final event: at once, with what waited
        await asyncio.sleep(0.01)
        return [queue.get_nowait() for _ in range(queue.qsize())], wakeups

    assert asyncio.run(run(10.0)) == (["first", "a", "b", "c", None], 2)
    assert asyncio.run(run(0.0)) == (["first", "a", "b", "c", None], 5)  # every event as it is made
