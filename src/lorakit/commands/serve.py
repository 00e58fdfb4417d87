"""`lorakit serve`: an OpenAI-compatible HTTP server for one base model and many adapters."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from lorakit.commands.specs import NAMED, parse_adapter_specs
from lorakit.errors import LorakitError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="OpenAI-compatible server: the request's `model` names the adapter")
    parser.add_argument("--model", default="default", help="'default' or a local model directory")
    parser.add_argument("--served-model-name", default=None, help="the base model's id in requests (default: its directory name)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="an adapter to serve (repeatable; pinned)")
    parser.add_argument("--adapter-root", default=None,
                        help="directory clients may load adapters from (POST /v1/load_lora_adapter); off when not given")
    parser.add_argument("--runs-root", default=None,
                        help="directory of training output dirs the web page at / may show loss curves of; off when not given")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $LORAKIT_API_KEY)")
    parser.add_argument("--max-loras", type=int, default=None, help="adapters held in memory at most (least recently used evicted)")
    parser.add_argument("--max-batch", type=int, default=32, help="requests decoded together (KV cache slots)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="context length per request (prompt + output)")
    parser.add_argument("--prefix-cache-mb", type=float, default=128,
                        help="memory for prompt blocks shared between requests (a system prompt's keys and values); 0: off")
    parser.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond the batch before 503")
    parser.add_argument("--stream-interval", type=float, default=30, metavar="MS",
                        help="a streamed answer's text is sent at most this often (its first piece and its end at once): "
                        "fewer, larger chunks leave the CPU to generation; 0 sends every token as it is made (default 30)")
    parser.add_argument("--deterministic", action="store_true",
                        help="batch-invariant mode: a greedy answer never depends on what else is running (slower)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the decode step (torch.compile, lorakit's C++ kernels) before serving: ~25%% more "
                        "tokens/s through HTTP on 2 cores, 10-60 s more at start-up (less once cached); without a C++ "
                        "compiler it warns and decodes eagerly. --no-compile starts at once (default: compile)")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    parser.add_argument("--quantization", default=None, choices=["none", "nf4", "fp4", "int8"],
                        help="load the base through bitsandbytes as `lorakit train --quantization` does (QLoRA); default: "
                        "the quantization an --adapter was trained on (its lorakit_quantization.json), else none")
    parser.add_argument("--quantize-weights", default=None, choices=["int8", "q4_0"],
                        help="serve a bf16 base with its projection weights quantized for lorakit's CPU kernels "
                        "(int8 per channel, or 4 bits per block of 32): fewer bytes read per token, adapters on top")
    parser.set_defaults(run=run)


def base_quantization(choice: str | None, adapters) -> tuple[object, str | None]:
    """The QuantConfig to load the base with, and a notice when it comes from the adapters' records: an
    adapter trained on a quantized base (QLoRA) is served on that base unless told otherwise."""
    from lorakit.quant.config import QuantConfig
    from lorakit.quant.record import read_quant_record

    if choice is not None:
        return QuantConfig.coerce(None if choice == "none" else choice), None
    records = {a.name: read_quant_record(a.directory) for a in adapters}
    recorded = {n: r for n, r in records.items() if r is not None and r.enabled}
    if not recorded:
        return QuantConfig(), None
    kinds = {json.dumps(r.to_dict(), sort_keys=True) for r in recorded.values()}
    if len(kinds) > 1 or len(recorded) < len(records):
        bases = ", ".join(f"{n}: {r.quantization if n in recorded else 'none'}" for n, r in records.items())
        raise LorakitError(f"the adapters were trained on different bases ({bases}); serve them apart, or choose one base "
                           "with --quantization")
    config = next(iter(recorded.values()))
    return config, (f"lorakit serve: the adapters were trained on a {config.quantization} base ({config.describe()}); serving "
                    "them on the same (--quantization none serves a bf16 base instead)")


# libgomp's default spin keeps OpenMP workers busy-waiting between the engine's many small ops, and on a
# small CPU that starves the HTTP thread: measured here, clients saw first tokens 3-18 s late in one run of
# two (the engine itself answered within 0.5 s). Too short a spin puts workers to sleep between the ops
# of one step: with 2,000 spins the server ran 17-22% below the in-process engine once the engine got
# faster; with 20,000 it ran 5-13% below, time to first token p95 0.36 s (bench/serve_throughput.py).
OPENMP_SPIN = ("GOMP_SPINCOUNT", "20000")


def relaunch_with_short_openmp_spin() -> None:
    """libgomp reads its spin count when it loads, before this code runs: re-exec the same command with
    it set (only when this process was started as `lorakit serve` and the user has not chosen one)."""
    name, value = OPENMP_SPIN
    if name not in os.environ and sys.argv[1:2] == ["serve"]:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, name: value})


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the server stack is only needed by this command

    relaunch_with_short_openmp_spin()
    from lorakit.infer.engine import Engine
    from lorakit.models.load import load_model, load_tokenizer, resolve_model_dir
    from lorakit.serve.app import build_app
    from lorakit.serve.state import ServeSettings

    for flag, value in (("--max-batch", args.max_batch), ("--max-model-len", args.max_model_len), ("--port", args.port)):
        if value < 1:
            raise LorakitError(f"{flag} must be >= 1")
    if args.stream_interval < 0:
        raise LorakitError("--stream-interval must be >= 0 milliseconds (0 sends every token as it is made)")
    if args.prefix_cache_mb < 0:
        raise LorakitError("--prefix-cache-mb must be >= 0 (0 turns prefix caching off)")
    root = Path(args.adapter_root) if args.adapter_root else None
    if root is not None and not root.is_dir():
        raise LorakitError(f"--adapter-root {root} is not a directory")
    runs_root = Path(args.runs_root) if args.runs_root else None
    if runs_root is not None and not runs_root.is_dir():
        raise LorakitError(f"--runs-root {runs_root} is not a directory")
    adapters = parse_adapter_specs(args.adapter, NAMED)
    model_dir = resolve_model_dir(args.model)
    name = args.served_model_name or model_dir.name
    if args.compile and not args.deterministic:  # the batch-invariant mode never compiles
        print("lorakit serve: compiling the decode step (up to a minute on a cold inductor cache)", flush=True)
    quant, notice = base_quantization(args.quantization, adapters)
    if quant.enabled and args.quantize_weights:
        raise LorakitError("--quantize-weights quantizes a bf16 base; drop it or --quantization (or pass --quantization none)")
    if notice:
        print(notice, flush=True)
    engine = Engine.from_model(load_model(args.model, dtype=args.dtype, quantization=quant if quant.enabled else None),
                               load_tokenizer(args.model), max_batch=args.max_batch, max_len=args.max_model_len,
                               deterministic=args.deterministic, max_loras=args.max_loras, prefix_cache_mb=args.prefix_cache_mb,
                               compile=args.compile, quantization=args.quantize_weights)
    for adapter in adapters:
        engine.registry.load(adapter.name, adapter.directory, pin=True)
    if engine.decoder.compiled is not None:  # its shapes compiled above; a shape it missed runs eagerly, not stalling everyone
        import torch

        torch.compiler.set_stance("eager_on_recompile")  # process-wide: this process is the server's own
    settings = ServeSettings(name, str(model_dir), args.api_key, root, max_waiting=args.max_waiting,
                             stream_interval=args.stream_interval / 1000, runs_root=runs_root)
    app = build_app(engine, settings)
    print(f"lorakit serve: http://{args.host}:{args.port}/v1  model {name!r}, adapters {[a.name for a in adapters]}"
          f"{', batch-invariant' if args.deterministic else ''}; workbench http://{args.host}:{args.port}/", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=30))
    serve_forever(engine, server)
    return 0


def serve_forever(engine, server) -> None:
    """HTTP in a thread, the engine's steps in this (the main) thread: the thread that loaded the model
    keeps making every torch call (a second OpenMP team on the same cores is 1.5-2x slower per step).
    SIGTERM / SIGINT: uvicorn stops accepting and finishes the open requests while the engine keeps
    stepping; then both stop and the process exits 0."""
    http = threading.Thread(target=server.run, name="lorakit-http", daemon=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    http.start()
    engine.run_forever(stop=lambda: not http.is_alive())
    http.join()
