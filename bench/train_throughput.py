"""Training throughput: lorakit against peft + transformers on the default model, side by side.

Each configuration runs in its own subprocess (so peak RSS is its own), one after the other, on the
same examples: lengths uniform in 64..512, the first quarter of each a prompt (no loss), r=16 on
q,k,v,o, 4 rows of up to 512 tokens per step. Reports useful (non-padding) tokens/s, peak RSS and
the ratios, plus the share of this CPU's bf16 matmul peak that lorakit's training reaches.

    .venv/bin/python bench/train_throughput.py            # all configurations twice, ~8 minutes idle
    .venv/bin/python bench/train_throughput.py --steps 3 --only c d --repeats 3
    .venv/bin/python bench/train_throughput.py --only e f     # DoRA, lorakit against peft (issue 22: >= 1.5x)
Run it on an otherwise idle machine: two benchmarks at once on 2 cores slow each other by up to 6x.
Even idle, this VM's speed drifts by 20-40% over minutes, so the configurations run round-robin
`--repeats` times and each reports its best run (peak RSS: its largest).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

from lorakit.data.tokenize import IGNORE_INDEX

CONFIGS = {
    "a": "peft, fp32, padded to 512 (the seeds' recipe)",
    "b": "peft, bf16, padded to the longest",
    "c": "peft at its best: bf16, SDPA, rows packed full",
    "d": "lorakit defaults",
    "e": "peft at its best (as c) with DoRA",
    "f": "lorakit defaults with DoRA",
}
DORA = {"e": "c", "f": "d"}
"""The DoRA configurations and the plain one each mirrors (same batches, use_dora=True)."""
ROWS, SEQ = 4, 512
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(64, 512)
        ids = [rng.randrange(100, 49000) for _ in range(length)]
        prompt = length // 4
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def peft_batches(kind: str, data, pad: int):
    """Batches as peft users build them: padded rows (a, b) or a token stream cut into full rows (c)."""
    import torch

    if kind == "c":
        ids = [t for e in data for t in e[0]]
        labels = [t for e in data for t in e[1]]
        for start in range(0, len(ids) - ROWS * SEQ + 1, ROWS * SEQ):
            chunk = slice(start, start + ROWS * SEQ)
            yield {"input_ids": torch.tensor(ids[chunk]).view(ROWS, SEQ), "labels": torch.tensor(labels[chunk]).view(ROWS, SEQ)}, ROWS * SEQ
        return
    for start in range(0, len(data) - ROWS + 1, ROWS):
        group = data[start : start + ROWS]
        width = SEQ if kind == "a" else max(len(e[0]) for e in group)
        ids = [e[0] + [pad] * (width - len(e[0])) for e in group]
        labels = [e[1] + [IGNORE_INDEX] * (width - len(e[1])) for e in group]
        mask = [[1] * len(e[0]) + [0] * (width - len(e[0])) for e in group]
        yield ({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)},
               sum(len(e[0]) for e in group))


def lorakit_batches(data, pad: int):
    from lorakit.data import batches, pack
    from lorakit.data.tokenize import TokenizedExample
    from lorakit.train.step import useful_tokens

    rows, _ = pack([TokenizedExample(i, l) for i, l in data], SEQ, pad, seed=0)
    for batch in batches(rows, ROWS, seed=0):
        yield batch, useful_tokens(batch)


def run_child(kind: str, steps: int) -> dict:
    import torch

    import lorakit
    from lorakit.models.load import load_model

    data = examples(400)
    torch.manual_seed(0)
    use_dora = kind in DORA
    kind = DORA.get(kind, kind)
    if kind == "d":
        from lorakit.train.step import CAUSAL_LM, train_step

        model = lorakit.get_peft_model(load_model("default", dtype="bfloat16"), lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=use_dora))
        stream = lorakit_batches(data, 2)

        def step(batch):  # the loop's micro-step: one micro-batch per optimizer step, normalised by its labels
            train_step(model, batch, normaliser=CAUSAL_LM.label_count(batch), objective=CAUSAL_LM, bf16=True)
    else:
        import peft

        dtype = torch.float32 if kind == "a" else torch.bfloat16
        model = peft.get_peft_model(load_model("default", dtype=dtype), peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM", use_dora=use_dora))
        stream = peft_batches(kind, data, 2)

        def step(batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind != "a"):
                loss = model(**batch).loss
            loss.backward()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens, seconds = 0, 0.0
    for i in range(steps + 1):  # the first step warms up and is not timed
        batch, useful = next(stream)
        started = time.perf_counter()
        step(batch)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            tokens, seconds = tokens + useful, seconds + time.perf_counter() - started
    return {"tokens_per_second": tokens / seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def bf16_matmul_peak() -> float:
    """GFLOP/s of a bf16 matmul of the decoder's largest shape, measured now."""
    import torch

    a, b = torch.randn(2048, 576, dtype=torch.bfloat16), torch.randn(576, 1536, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    started, n = time.perf_counter(), 50
    for _ in range(n):
        a @ b
    return 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - started) / 1e9


def training_flops_per_token() -> float:
    """Matmul FLOPs per trained token for LoRA on a frozen base: forward 2N, backward 2N (input
    gradients only; the frozen weights get none), over SmolLM2-135M's linear layers, the output head on
    the 3/4 of tokens that carry a label, and causal attention at the mean context of these examples."""
    layers, hidden, inter, kv, vocab = 30, 576, 1536, 192, 49152
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    mean_context = 288 / 2  # lengths uniform in 64..512, causal
    attention = layers * 2 * 2 * mean_context * hidden  # QK^T and PV
    return 4 * linear + 4 * vocab * hidden * 0.75 + 3 * attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=2, help="round-robin runs per configuration; the best counts")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.steps)))
        return
    results: dict[str, dict] = {}
    for round_ in range(args.repeats):
        for kind in args.only:
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(args.steps)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"configuration {kind} failed:\n{out.stderr[-2000:]}")
            run = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  run {round_ + 1}/{args.repeats} ({kind}): {run['tokens_per_second']:.0f} tokens/s, {run['peak_rss_gb']:.2f} GB", flush=True)
            best = results.setdefault(kind, run)
            best["tokens_per_second"] = max(best["tokens_per_second"], run["tokens_per_second"])
            best["peak_rss_gb"] = max(best["peak_rss_gb"], run["peak_rss_gb"])
    for kind, result in results.items():
        print(f"({kind}) {CONFIGS[kind]:<48} {result['tokens_per_second']:8.0f} useful tokens/s   peak RSS {result['peak_rss_gb']:.2f} GB")
    if "e" in results and "f" in results:
        print(f"lorakit DoRA / peft DoRA: {results['f']['tokens_per_second'] / results['e']['tokens_per_second']:.2f}x tokens/s, "
              f"{results['f']['peak_rss_gb'] / results['e']['peak_rss_gb']:.2f}x peak RSS")
    if "d" in results:
        mine = results["d"]["tokens_per_second"]
        for kind in ("a", "b", "c"):
            if kind in results:
                print(f"lorakit / ({kind}): {mine / results[kind]['tokens_per_second']:.2f}x tokens/s, {results['d']['peak_rss_gb'] / results[kind]['peak_rss_gb']:.2f}x peak RSS")
        peak = bf16_matmul_peak()
        achieved = mine * training_flops_per_token() / 1e9
        print(f"bf16 matmul peak now: {peak:.0f} GFLOP/s; lorakit training reaches {achieved:.0f} GFLOP/s = {achieved / peak:.0%} of it")
        print(f"ceiling if every training FLOP ran at that peak: {peak * 1e9 / training_flops_per_token():.0f} tokens/s")


if __name__ == "__main__":
    main()
