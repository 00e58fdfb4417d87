"""Serving peers for the benches: start/stop vLLM's CPU server and drive any OpenAI-style server with load.

vLLM is a *peer*, never a dependency: it lives in its own venv (built by bench/setup_vllm.sh, default
/work/vllm-venv) and is started as a subprocess. The load client talks plain OpenAI
`POST /v1/chat/completions` with `stream: true`, so the same client measures lorakit's server too.

    from bench.peers import start_vllm, wait_healthy, run_chat_load, summarize, stop
    proc = start_vllm("/work/vllm-venv", model_dir, {"a0": dir0, "a1": dir1}, port=8011)
    try:
        wait_healthy("http://127.0.0.1:8011", proc=proc)
        t0 = time.perf_counter()
        results = run_chat_load("http://127.0.0.1:8011", bodies, concurrency=16)
        print(summarize(results, time.perf_counter() - t0))
    finally:
        stop(proc)

HTTP client: httpx if importable, else httpx2 (same API; what lorakit's venv gets through openai and
huggingface_hub), else threads + urllib (CLIENT names the one in use); environment proxies are ignored.
Nothing here imports lorakit. Import it as `bench.peers` from the repo root, or as `peers` from a script
in bench/ (python bench/x.py puts bench/ on sys.path).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

try:  # httpx, or its successor httpx2 with the same API
    import httpx as _httpx
except ImportError:  # pragma: no cover - depends on the venv
    try:
        import httpx2 as _httpx
    except ImportError:
        _httpx = None

CLIENT = "urllib+threads" if _httpx is None else _httpx.__name__  # which HTTP client run_chat_load uses
# Benches talk to servers on this machine only: never route them through an environment proxy.
_urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open

DEFAULT_VLLM_VENV = "/work/vllm-venv"

# From shared/FACTS.md: without the two thread variables vLLM keeps one of the 2 cores for itself and
# runs the model on one thread; 4 GiB of KV cache.
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "4",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}


# --- vLLM process ----------------------------------------------------------------------------------
def vllm_command(venv: str, model_dir: str, adapters: Mapping[str, str], port: int, max_lora_rank: int = 16,
                 max_model_len: int = 2048, extra_args: Iterable[str] = ()) -> list[str]:
    """The argv that start_vllm runs (the `vllm` console script does not work with vllm-cpu; use -m)."""
    cmd = [str(Path(venv) / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16", "--max-model-len", str(max_model_len)]
    if adapters:
        cmd += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in adapters.items()),
                "--max-loras", str(len(adapters)), "--max-lora-rank", str(max_lora_rank)]
    return cmd + [str(a) for a in extra_args]


def start_vllm(venv: str, model_dir: str, adapters: Mapping[str, str], port: int, max_lora_rank: int = 16,
               max_model_len: int = 2048, extra_args: Iterable[str] = (), log_path: str | None = None,
               env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start vLLM's OpenAI server (CPU build) on 127.0.0.1:port; returns at once (see wait_healthy).

    `adapters` maps served model names to peft adapter directories (empty: no LoRA flags). stdout and
    stderr go to `log_path` (default: a fresh file under /tmp), available as `proc.log_path`. The
    process leads its own process group, so stop() also ends the engine-core worker it spawns.
    `env` adds to / overrides the environment (VLLM_ENV is always set first).
    """
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} not found; build the venv with: bash bench/setup_vllm.sh {venv}")
    cmd = vllm_command(venv, model_dir, adapters, port, max_lora_rank, max_model_len, extra_args)
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"vllm_{port}_", suffix=".log")
        os.close(fd)
    full_env = {**os.environ, **VLLM_ENV, **(env or {})}
    full_env.pop("VIRTUAL_ENV", None)
    log = open(log_path, "wb")
    try:
        log.write(("$ " + " ".join(f"{k}={v}" for k, v in VLLM_ENV.items()) + " " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                                start_new_session=True)
    finally:
        log.close()  # the child holds its own copy
    proc.log_path = log_path  # type: ignore[attr-defined]
    proc.started_at = time.perf_counter()  # type: ignore[attr-defined]
    return proc


def log_tail(proc: subprocess.Popen, lines: int = 40) -> str:
    """The last `lines` lines of a process's log (start_vllm's log_path)."""
    path = getattr(proc, "log_path", None)
    if not path or not os.path.exists(path):
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def wait_healthy(url: str, timeout: float = 180, proc: subprocess.Popen | None = None, interval: float = 0.5) -> float:
    """Poll `GET {url}/health` until it answers 200; returns the seconds waited.

    Raises RuntimeError with the log tail if `proc` exits first, TimeoutError after `timeout` seconds.
    """
    t0 = time.perf_counter()
    health = url.rstrip("/") + "/health"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {health} answered; "
                               f"log {getattr(proc, 'log_path', '?')}:\n{log_tail(proc)}")
        try:
            with _urlopen(health, timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.perf_counter() - t0 > timeout:
            tail = f"\n{log_tail(proc)}" if proc is not None else ""
            raise TimeoutError(f"{health} not healthy after {timeout:.0f} s{tail}")
        time.sleep(interval)


def stop(proc: subprocess.Popen | None, grace: float = 20) -> int | None:
    """SIGTERM the server (its whole process group), then SIGKILL after `grace` seconds; returns the exit code."""
    if proc is None:
        return None

    def signal_group(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # start_vllm made it a group leader: this reaches its workers too
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    if proc.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            proc.wait(timeout=10)
    # the group may outlive its leader (a worker still shutting down): make sure it is gone
    try:
        os.killpg(proc.pid, 0)
    except (ProcessLookupError, PermissionError):
        return proc.returncode
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return proc.returncode
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.returncode


# --- load client -----------------------------------------------------------------------------------
def _new_result(index: int, body: Mapping) -> dict:
    return {"index": index, "model": body.get("model"), "text": "", "completion_tokens": 0, "chunks": 0,
            "usage_reported": False, "finish_reason": None, "latency": None, "ttft": None, "status": None,
            "error": None}


def _prepare(body: Mapping) -> dict:
    body = dict(body)
    body["stream"] = True
    body.setdefault("stream_options", {"include_usage": True})
    return body


def _consume_event(data: str, res: dict, t_start: float) -> None:
    """Fold one SSE `data:` payload into the result."""
    if data == "[DONE]":
        return
    event = json.loads(data)
    if "error" in event and not event.get("choices"):
        res["error"] = str(event["error"])
        return
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        piece = delta.get("content")
        if piece is None:
            piece = choice.get("text")  # completions-style chunk
        if piece:
            if res["ttft"] is None:
                res["ttft"] = time.perf_counter() - t_start
            res["text"] += piece
            res["chunks"] += 1
        if choice.get("finish_reason"):
            res["finish_reason"] = choice["finish_reason"]
    usage = event.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        res["completion_tokens"] = int(usage["completion_tokens"])
        res["usage_reported"] = True


def _finish(res: dict, t_start: float) -> dict:
    res["latency"] = time.perf_counter() - t_start
    if not res["usage_reported"]:
        res["completion_tokens"] = res["chunks"]
    if res["error"] is None and res["status"] is not None and res["status"] != 200:
        res["error"] = f"HTTP {res['status']}"
    return res


def _headers(api_key: str | None) -> dict:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


async def _run_httpx(url: str, bodies: Sequence[dict], concurrency: int, api_key: str | None, timeout: float) -> list[dict]:
    results: list[dict | None] = [None] * len(bodies)
    next_index = 0
    limits = _httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with _httpx.AsyncClient(timeout=_httpx.Timeout(timeout, connect=30), limits=limits,
                                  trust_env=False) as client:
        async def one(i: int) -> None:
            res = _new_result(i, bodies[i])
            t_start = time.perf_counter()
            try:
                async with client.stream("POST", url, json=_prepare(bodies[i]), headers=_headers(api_key)) as r:
                    res["status"] = r.status_code
                    if r.status_code != 200:
                        res["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode('utf-8', 'replace')[:500]}"
                    else:
                        async for line in r.aiter_lines():
                            if line.startswith("data:"):
                                _consume_event(line[5:].strip(), res, t_start)
            except Exception as e:  # noqa: BLE001 - recorded per request
                res["error"] = f"{type(e).__name__}: {e}"
            results[i] = _finish(res, t_start)

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(bodies):
                i = next_index
                next_index += 1
                await one(i)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return results  # type: ignore[return-value]


def _run_threads(url: str, bodies: Sequence[dict], concurrency: int, api_key: str | None, timeout: float) -> list[dict]:
    results: list[dict | None] = [None] * len(bodies)
    lock = threading.Lock()
    counter = iter(range(len(bodies)))

    def one(i: int) -> None:
        res = _new_result(i, bodies[i])
        t_start = time.perf_counter()
        req = urllib.request.Request(url, data=json.dumps(_prepare(bodies[i])).encode(), headers=_headers(api_key),
                                     method="POST")
        try:
            with _urlopen(req, timeout=timeout) as r:
                res["status"] = r.status
                for raw in r:
                    line = raw.decode("utf-8", "replace").strip()
                    if line.startswith("data:"):
                        _consume_event(line[5:].strip(), res, t_start)
        except urllib.error.HTTPError as e:
            res["status"] = e.code
            res["error"] = f"HTTP {e.code}: {e.read().decode('utf-8', 'replace')[:500]}"
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"
        results[i] = _finish(res, t_start)

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            one(i)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, len(bodies)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results  # type: ignore[return-value]


def run_chat_load(base_url: str, requests: Sequence[dict], concurrency: int, api_key: str | None = None,
                  timeout: float = 600) -> list[dict]:
    """Send each request body to `{base_url}/v1/chat/completions`, streamed, `concurrency` in flight.

    Each body is a full OpenAI chat request (model, messages, max_tokens, temperature, ...);
    `stream: true` is forced and `stream_options: {"include_usage": true}` added unless given.
    Returns one dict per request, in input order: index, model, text, completion_tokens (the server's
    usage if it reported one, else the number of content chunks; usage_reported says which),
    finish_reason, latency and ttft (seconds from send; ttft None if no content arrived), status
    (HTTP code or None), error (None on success).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    url = base_url.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
    if not requests:
        return []
    if _httpx is not None:
        return asyncio.run(_run_httpx(url, list(requests), concurrency, api_key, timeout))
    return _run_threads(url, list(requests), concurrency, api_key, timeout)


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: Sequence[dict], wall_seconds: float) -> dict:
    """Aggregate a run_chat_load result: tokens/s over the wall time, latency and TTFT percentiles, errors."""
    ok = [r for r in results if r.get("error") is None]
    lat = [r["latency"] for r in ok if r.get("latency") is not None]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tokens = sum(r.get("completion_tokens") or 0 for r in ok)
    errors = [f"#{r.get('index')}: {r.get('error')}" for r in results if r.get("error") is not None]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": errors[:5],
        "completion_tokens": tokens,
        "wall_s": wall_seconds,
        "tokens_per_s": tokens / wall_seconds if wall_seconds > 0 else None,
        "latency_p50": _percentile(lat, 50),
        "latency_p95": _percentile(lat, 95),
        "ttft_p50": _percentile(ttft, 50),
        "ttft_p95": _percentile(ttft, 95),
        "mean_tokens_per_request": statistics.fmean([r["completion_tokens"] for r in ok]) if ok else None,
    }
