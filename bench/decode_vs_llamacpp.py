"""Decoding against llama.cpp (issue 21, "Figures"): `lorakit serve` at bf16, `--quantize-weights int8` and
`--quantize-weights q4_0` against llama.cpp's `llama-server` at bf16, q8_0 and q4_1, side by side in one run.

Default model, 8 random adapters r=16 on q,k,v,o (generate_throughput.make_adapters), greedy, streamed chat
requests over HTTP, EOS ignored so every system makes the same tokens. Three loads on each of the six servers:
16 clients over the 8 adapters (64 requests, 64 new tokens), 16 clients on the base only, and one stream of
256 tokens with one adapter. Then the issue's ratios, the peak RSS of lorakit serve at bf16 and int8, and
the quality of lorakit's int8 / q4_0 weights against bf16 (logit error and greedy agreement, in-process,
teacher-forced on the bf16 engine's tokens and free-running).

llama.cpp is a peer, never a dependency: build `llama-server` and `llama-quantize` outside the repository from
the llama-cpp-python sdist (README, "GGUF out"). Its inputs are built once under --work: BF16 and Q8_0 bases by
`llama-quantize --allow-requantize` from the default model's Q4_1 GGUF (the file lorakit's default model is
converted from, so both sides hold the same weights), that Q4_1 file itself, and the adapters by
`lorakit export-gguf`. llama-server loads all 8 with `--lora-init-without-apply` (scale 0) and each request
picks its own with `"lora": [{"id": K, "scale": 1}]`.

    .venv/bin/python bench/decode_vs_llamacpp.py                 # full run, ~15 minutes on an idle 2-core machine
    nice .venv/bin/python bench/decode_vs_llamacpp.py --quick    # smoke run: few requests and tokens
    .venv/bin/python bench/decode_vs_llamacpp.py --llama-cpp DIR # DIR holds llama-server and llama-quantize
Run it on an otherwise idle machine: two benchmarks at once on 2 cores slow each other by up to 6x.
Every server this script starts is stopped on the way out (its whole process group), whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402  (bench/peers.py)
from serve_throughput import lorakit_exe  # noqa: E402
from vllm_peer import BASE_NAME, chat_bodies, free_port, load_row, timed_load, warm_up  # noqa: E402

ADAPTERS = 8
LLAMA_CPP = "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
LORAKIT_MODES = {"bf16": None, "int8": "int8", "q4_0": "q4_0"}  # label -> --quantize-weights
LLAMA_TYPES = {"bf16": "BF16", "q8_0": "Q8_0", "q4_1": None}  # label -> llama-quantize type (None: the Q4_1 source itself)
QUALITY_CHATS = ["Write a few sentences about the ocean.", "Explain how a bicycle stays upright.",
                 "List three facts about honeybees.", "Give one tip for someone who is new to chess."]


# --- servers as processes ---------------------------------------------------------------------------
class Server:
    """`with Server(label, cmd, url) as s:` starts a server in its own process group, waits for /health and
    a warm-up, samples its RSS in the background, and stops the whole group on exit."""

    def __init__(self, label: str, cmd: list[str], port: int, warm_model: str, timeout: float = 900) -> None:
        self.label, self.cmd, self.port, self.warm_model, self.timeout = label, cmd, port, warm_model, timeout
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.peak_rss = 0  # process + children, sampled every 0.2 s from start to stop
        self.hwm: int | None = None  # the server process's own VmHWM (the kernel's exact peak), read before stopping
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Server:
        fd, log_path = tempfile.mkstemp(prefix=f"bench_{self.label.replace(' ', '_')}_", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            log.write(("$ " + " ".join(self.cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.proc.log_path = log_path  # type: ignore[attr-defined]  (peers.log_tail reads it)
        try:
            self._sampler.start()
            print(f"  starting {self.label} on {self.url} (log {log_path}) ...", flush=True)
            waited = peers.wait_healthy(self.url, timeout=self.timeout, proc=self.proc)
            print(f"  {self.label} healthy after {waited:.0f} s", flush=True)
            warm_up(self.url, self.warm_model)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self._stop.is_set():
            return
        self.hwm = vm_hwm(self.proc.pid)
        self._stop.set()
        code = peers.stop(self.proc, grace=40)
        print(f"  {self.label} stopped (exit code {code})", flush=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            try:
                process = psutil.Process(self.proc.pid)
                rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
            except psutil.Error:
                continue
            self.peak_rss = max(self.peak_rss, rss)


def vm_hwm(pid: int) -> int | None:
    """The process's peak resident set (VmHWM in /proc/PID/status), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def lorakit_server(exe: str, paths: dict[str, Path], mode: str | None, args) -> Server:
    port = free_port()
    cmd = [exe, "serve", "--model", "default", "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.concurrency), "--max-model-len", "2048"]
    for name, path in paths.items():
        cmd += ["--adapter", f"{name}={path}"]
    if mode:
        cmd += ["--quantize-weights", mode]
    if args.no_compile:
        cmd.append("--no-compile")
    return Server(f"lorakit serve {mode or 'bf16'}", cmd, port, "a0")


def llama_server(bin_dir: Path, model: Path, loras: Sequence[Path], label: str, args, no_repack: bool = False) -> Server:
    port = free_port()
    # 1024 positions per slot: a prompt and the 256-token stream fit. --lora takes one comma-separated list
    # (given twice, only the last one is loaded); ids are that list's order.
    cmd = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-t", "2", "-np", str(args.concurrency), "-c", str(1024 * args.concurrency),
           "--lora", ",".join(str(lora) for lora in loras), "--lora-init-without-apply"]
    if no_repack:
        cmd.append("--no-repack")
    return Server(f"llama.cpp {label}" + (" -nr" if no_repack else ""), cmd, port, BASE_NAME)


@contextlib.contextmanager
def running_llama(bin_dir: Path, model: Path, loras: Sequence[Path], label: str, args) -> Iterator[Server]:
    """llama-server with its weight repacking (AMX / interleaved quant layouts); if it dies of a signal while
    loading (SIGILL or SIGSEGV in its AMX path on a 2-core Sapphire Rapids VM, 2026-12-02), again with
    --no-repack, said aloud."""
    server = llama_server(bin_dir, model, loras, label, args)
    try:
        server.__enter__()
    except RuntimeError:
        if server.proc is None or server.proc.returncode not in (-signal.SIGILL, -signal.SIGSEGV):
            raise
        print(f"  NOTE llama.cpp {label} died of signal {-server.proc.returncode} loading its repacked weights; running it "
              "with --no-repack", flush=True)
        server = llama_server(bin_dir, model, loras, label, args, no_repack=True)
        server.__enter__()
    try:
        yield server
    finally:
        server.stop()


# --- llama.cpp's inputs, built once -------------------------------------------------------------------
def llama_inputs(bin_dir: Path, work: Path, exe: str, paths: dict[str, Path]) -> tuple[dict[str, Path], list[Path]]:
    """The three base GGUFs and the 8 adapter GGUFs under `work` (each written beside its target, then renamed)."""
    from lorakit.models.default import gguf_path

    work.mkdir(parents=True, exist_ok=True)
    source = gguf_path()
    bases = {}
    for label, kind in LLAMA_TYPES.items():
        if kind is None:
            bases[label] = source
            continue
        target = work / f"base-{label}.gguf"
        if not target.is_file():
            partial = target.with_suffix(".partial")
            print(f"  llama-quantize --allow-requantize {source.name} -> {target.name} ({kind})", flush=True)
            subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(source), str(partial), kind],
                           check=True, capture_output=True)
            partial.rename(target)
        bases[label] = target
    loras = []
    for name, path in paths.items():
        target = work / f"{name}.gguf"
        if not target.is_file():  # export-gguf writes atomically
            subprocess.run([exe, "export-gguf", str(path), "-o", str(target), "--base", "default"], check=True,
                           capture_output=True)
        loras.append(target)
    print(f"  llama.cpp inputs in {work}: bases {', '.join(bases)}; {len(loras)} adapters (lorakit export-gguf)", flush=True)
    return bases, loras


# --- the loads ---------------------------------------------------------------------------------------
def with_llama_lora(bodies: list[dict], adapters: Sequence[str | None]) -> list[dict]:
    """llama-server's per-request adapter choice: `lora` ids in the order of its --lora list. A request without
    `lora` gets every adapter at its load scale (1.0): base requests set one to 0, and every unnamed one is 0."""
    out = []
    for body, adapter in zip(bodies, adapters):
        body = {**body, "model": BASE_NAME}
        body["lora"] = [{"id": 0 if adapter is None else int(adapter[1:]), "scale": 0.0 if adapter is None else 1.0}]
        out.append(body)
    return out


def three_loads(server: Server, messages: list[list[dict]], adapters: list[str], args, llama: bool) -> dict:
    """16 clients over the adapters, 16 on the base, one stream with a0; rows of tokens/s."""
    def bodies(models: Sequence[str | None], tokens: int, msgs=messages) -> list[dict]:
        made = chat_bodies(msgs, models, tokens)
        return with_llama_lora(made, models) if llama else made

    rows = {}
    results, wall = timed_load(server.url, bodies(adapters, args.new_tokens), args.concurrency)
    rows["mixed"] = load_row(f"{server.label}, {ADAPTERS} adapters", results, wall)
    results, wall = timed_load(server.url, bodies([None] * len(messages), args.new_tokens), args.concurrency)
    rows["base"] = load_row(f"{server.label}, base only", results, wall)
    results, wall = timed_load(server.url, bodies(["a0"], args.single_tokens, messages[:1]), 1)
    result = results[0]
    if result["error"] is not None:
        raise RuntimeError(f"{server.label}: the single stream failed: {result['error']}")
    rows["single"] = result["completion_tokens"] / wall
    print(f"  {server.label}, one stream of {args.single_tokens} tokens (a0): {rows['single']:.1f} tok/s "
          f"({result['completion_tokens']} tokens in {wall:.1f}s, ttft {result['ttft']:.2f}s)", flush=True)
    for key in ("mixed", "base"):
        if rows[key]["errors"]:
            raise RuntimeError(f"{server.label}: {rows[key]['errors']} requests failed in the {key} load")
        if rows[key]["tokens"] != len(messages) * args.new_tokens:
            print(f"  NOTE {server.label}: {rows[key]['tokens']} tokens in the {key} load, expected "
                  f"{len(messages) * args.new_tokens}", flush=True)
    return rows


# --- quality of the quantized weights (in-process) ------------------------------------------------------
def quality(paths: dict[str, Path], prompts_text: Sequence[str], tokens: int) -> dict[str, dict]:
    """int8 and q4_0 against bf16 on the same prompts with adapter a0: the logits at each position of the
    bf16 engine's greedy reply (teacher-forced), and each mode's own greedy reply against bf16's."""
    from generate_throughput import lorakit_model

    from lorakit import load_tokenizer
    from lorakit.infer.engine import Engine
    from lorakit.infer.sampling import SamplingParams

    tokenizer = load_tokenizer("default")
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    reference, replies, stats = None, {}, {}
    for label, mode in LORAKIT_MODES.items():
        # a fresh model per engine: the engine packs the weights of the model it is given
        engine = Engine.from_model(lorakit_model(paths, "default"), tokenizer, max_batch=1, max_len=1024, quantization=mode)
        try:
            prompts = [engine.chat_prompt([{"role": "user", "content": c}]) for c in prompts_text]
            replies[label] = [c.token_ids for c in engine.generate(prompts, ["a0"] * len(prompts), params)]
            if reference is None:
                reference = replies[label]
            logits = [forced_logits(engine, p, r) for p, r in zip(prompts, reference)]
        finally:
            engine.close(cancel=True)
        if label == "bf16":
            bf16_logits = logits
            continue
        rel, worst, top1, total = [], 0.0, 0, 0
        for mine, theirs in zip(logits, bf16_logits):
            rel.append(((mine - theirs).norm(dim=-1) / theirs.norm(dim=-1)).mean().item())
            worst = max(worst, (mine - theirs).abs().max().item())
            top1 += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
            total += mine.shape[0]
        same_prefix = [next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref)))
                       for mine, ref in zip(replies[label], reference)]
        stats[label] = {"rel": sum(rel) / len(rel), "max_abs": worst, "top1": top1 / total,
                        "equal": sum(m == r for m, r in zip(replies[label], reference)), "prompts": len(reference),
                        "prefix": sum(same_prefix) / len(same_prefix), "tokens": tokens}
        print(f"  {label} vs bf16: logits relative error {100 * stats[label]['rel']:.2f}% (mean over positions), max "
              f"|diff| {worst:.3f}; argmax agrees at {100 * stats[label]['top1']:.1f}% of {total} positions; greedy "
              f"replies equal for all {tokens} tokens {stats[label]['equal']} of {len(reference)}, first "
              f"{stats[label]['prefix']:.1f} tokens equal on average", flush=True)
    return stats


def forced_logits(engine, prompt: list[int], reply: list[int]):
    """(len(reply), V) fp32 logits: after the prompt, then after each token of `reply` fed in turn (one row, a0)."""
    import torch

    decoder = engine.decoder
    cache = decoder.allocate(1, len(prompt) + len(reply) + 1)
    routing = engine.registry.routing(["a0"], engine.device)
    out = [decoder.prefill(cache, 0, torch.tensor([prompt]), torch.tensor([len(prompt)]), routing)[0].float()]
    for i, token in enumerate(reply[:-1]):
        out.append(decoder.decode(cache, torch.tensor([token]), torch.tensor([len(prompt) + i]), routing)[0].float())
    return torch.stack(out)


# --- report --------------------------------------------------------------------------------------------
def report(lorakit: dict[str, dict], llama: dict[str, dict], llama_labels: dict[str, str], rss: dict[str, Server], stats: dict,
           args, seconds: float) -> None:
    def rate(row) -> float:
        return row if isinstance(row, float) else row["tokens/s"]

    loads = (("mixed", f"16 clients over {ADAPTERS} adapters"), ("base", "16 clients, base only"),
             ("single", f"1 stream, {args.single_tokens} tokens, a0"))
    if args.concurrency != 16:
        loads = tuple((k, t.replace("16 clients", f"{args.concurrency} clients")) for k, t in loads)
    columns = [(f"lorakit {m}", lorakit[m]) for m in lorakit] + [(llama_labels[m], llama[m]) for m in llama]
    print(f"\n{'=' * 110}\nFINAL TABLE (tokens/s; {args.requests} requests, {args.new_tokens} new tokens, greedy, streamed, "
          f"{seconds:.0f} s in all)")
    print(f"  {'load':<34}" + "".join(f"{name:>19}" for name, _ in columns))
    for key, title in loads:
        print(f"  {title:<34}" + "".join(f"{rate(rows[key]):19.1f}" for _, rows in columns))

    def best(rows: dict[str, dict], key: str, among: Sequence[str] | None = None) -> tuple[str, float]:
        name = max((m for m in rows if among is None or m in among), key=lambda m: rate(rows[m][key]))
        return name, rate(rows[name][key])

    def ratio(target: float, ours: tuple[str, float], theirs: tuple[str, float], what: str) -> None:
        value = ours[1] / theirs[1]
        print(f"  {what}: lorakit {ours[0]} {ours[1]:.1f} / llama.cpp {theirs[0]} {theirs[1]:.1f} = {value:.2f}x "
              f"(target >= {target}x)  {'PASS' if value >= target else 'FAIL'}")

    if lorakit and llama:
        print("\nratios (issue 21):")
        quants = [m for m in lorakit if m != "bf16"]
        ratio(1.3, best(lorakit, "single", quants), best(llama, "single", ["q8_0", "q4_1"]),
              "one stream with an adapter, best quantized mode / best quant")
        ratio(6, best(lorakit, "mixed"), best(llama, "mixed"), f"16 clients over {ADAPTERS} adapters, best / best")
        ratio(2, best(lorakit, "base"), best(llama, "base"), "16 clients, base only, best / best")
        print(f"  (lorakit bf16 / llama.cpp's best: {ADAPTERS} adapters "
              f"{rate(lorakit['bf16']['mixed']) / best(llama, 'mixed')[1]:.2f}x, base "
              f"{rate(lorakit['bf16']['base']) / best(llama, 'base')[1]:.2f}x, one stream "
              f"{rate(lorakit['bf16']['single']) / best(llama, 'single')[1]:.2f}x)")

    mb = lambda b: f"{b / 2**20:.0f} MB" if b else "n/a"  # noqa: E731
    print("\npeak RSS of the server process (VmHWM; sampled process + children in brackets):")
    for label, server in rss.items():
        print(f"  {server.label:<24} {mb(server.hwm):>9}  ({mb(server.peak_rss)})")
    if "bf16" in rss and "int8" in rss and rss["bf16"].hwm and rss["int8"].hwm:
        value = rss["int8"].hwm / rss["bf16"].hwm
        print(f"  lorakit int8 / bf16: {value:.2f}x (target <= 0.6x)  {'PASS' if value <= 0.6 else 'FAIL'}")
    if stats:
        print(f"\nquality vs bf16 (in-process Engine, a0, {len(QUALITY_CHATS[:args.quality_prompts])} prompts, "
              f"{args.quality_tokens} tokens):")
        for label, s in stats.items():
            print(f"  {label:<5} logits rel. error {100 * s['rel']:.2f}%, max |diff| {s['max_abs']:.3f}, argmax agreement "
                  f"{100 * s['top1']:.1f}%, greedy replies equal {s['equal']}/{s['prompts']}, equal prefix {s['prefix']:.1f} "
                  f"of {s['tokens']} tokens")
    print("=" * 110, flush=True)


# --- main ------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests of the two 16-client loads")
    parser.add_argument("--concurrency", type=int, default=16, help="clients (lorakit --max-batch, llama-server -np)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--single-tokens", type=int, default=256, help="tokens of the one-stream load")
    parser.add_argument("--quality-prompts", type=int, default=4, help=f"prompts of the quality check (at most {len(QUALITY_CHATS)})")
    parser.add_argument("--quality-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 requests of 16 tokens, a 32-token stream, "
                        "2 quality prompts of 16 tokens")
    parser.add_argument("--llama-cpp", default=os.environ.get("LORAKIT_LLAMA_CPP", LLAMA_CPP),
                        help=f"directory holding llama-server and llama-quantize (default $LORAKIT_LLAMA_CPP or {LLAMA_CPP})")
    parser.add_argument("--work", default="/tmp/lorakit-bench/llamacpp", help="where llama.cpp's GGUF inputs are built once")
    parser.add_argument("--adapters-dir", default="/tmp/lorakit-bench/adapters")
    parser.add_argument("--lorakit", default=None, help="the lorakit console script (default: next to this python)")
    parser.add_argument("--no-compile", action="store_true", help="lorakit serve --no-compile (default: compiled, as serve does)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-lorakit", action="store_true", help="llama.cpp's servers only (no ratios)")
    parser.add_argument("--skip-llama", action="store_true", help="lorakit's servers only (no ratios)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.new_tokens, args.single_tokens = 16, 16, 32
        args.quality_prompts, args.quality_tokens = 2, 16
    bin_dir = Path(args.llama_cpp)
    missing = [n for n in ("llama-server", "llama-quantize") if not (bin_dir / n).is_file()]
    if missing:
        print(f"{', '.join(missing)} not found in {bin_dir}; build llama.cpp (README, 'GGUF out') and pass --llama-cpp DIR",
              file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so that every server this run started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from generate_throughput import chat_requests, make_adapters

    t_start = time.perf_counter()
    exe = lorakit_exe(args.lorakit)
    paths = make_adapters(Path(args.adapters_dir), "default")
    bases, loras = llama_inputs(bin_dir, Path(args.work), exe, paths)
    messages = chat_requests(args.requests)
    adapters = [f"a{i % ADAPTERS}" for i in range(args.requests)]
    print(f"decode vs llama.cpp: default model, {ADAPTERS} adapters r=16 q,k,v,o; {args.requests} requests, "
          f"{args.concurrency} clients, {args.new_tokens} new tokens; HTTP client {peers.CLIENT}; {os.cpu_count()} CPUs",
          flush=True)

    lorakit_rows, llama_rows, servers, llama_labels = {}, {}, {}, {}
    for label, mode in ([] if args.skip_lorakit else LORAKIT_MODES.items()):
        print(f"\nlorakit serve {label}:", flush=True)
        with lorakit_server(exe, paths, mode, args) as server:
            lorakit_rows[label] = three_loads(server, messages, adapters, args, llama=False)
        servers[label] = server
    for label, model in ({} if args.skip_llama else bases).items():
        print(f"\nllama.cpp {label} ({model.name}):", flush=True)
        with running_llama(bin_dir, model, loras, label, args) as server:
            llama_rows[label] = three_loads(server, messages, adapters, args, llama=True)
        llama_labels[label] = server.label

    stats = {}
    if not args.skip_quality:
        print(f"\nquality of lorakit's quantized weights vs bf16 (in-process, a0, {args.quality_tokens} tokens):", flush=True)
        stats = quality(paths, QUALITY_CHATS[: args.quality_prompts], args.quality_tokens)
    report(lorakit_rows, llama_rows, llama_labels, servers, stats, args, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
