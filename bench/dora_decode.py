"""DoRA in the engine's mixed batches: one decode step (and one prefill) of 16 rows over 8 DoRA adapters
against the same over 8 plain LoRA adapters (r=16 on q, k, v, o, the default model in bf16, the
compiled engine serve runs), interleaved in one process. The issue's target: DoRA <= 1.3x plain.

    .venv/bin/python bench/dora_decode.py          # ~3 minutes on an idle 2-core machine
"""

from __future__ import annotations

import sys
import time

import torch

from lorakit import LoraConfig, get_peft_model, load_model, load_tokenizer
from lorakit.infer.engine import Engine

ADAPTERS, ROWS, CONTEXT = 8, 16, 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def engine_with(dora: bool) -> Engine:
    model = load_model("default", dtype=torch.bfloat16)
    torch.manual_seed(0)
    config = dict(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=dora)
    lora = get_peft_model(model, LoraConfig(**config), "a0")
    for i in range(1, ADAPTERS):
        lora.add_adapter(f"a{i}", LoraConfig(**config))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.05)
    return Engine.from_model(lora.eval(), load_tokenizer("default"), max_batch=ROWS, max_len=CONTEXT + 8, compile=True)


def best(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    engines = {"plain": engine_with(False), "dora": engine_with(True)}
    ids = torch.randint(100, 40000, (ROWS, CONTEXT))
    specs = [f"a{i % ADAPTERS}" for i in range(ROWS)]
    results: dict[str, dict[str, list[float]]] = {k: {"decode": [], "prefill": []} for k in engines}
    caches = {k: e.decoder.allocate(ROWS, CONTEXT + 1) for k, e in engines.items()}
    for _ in range(3):  # interleaved rounds: the machine's speed drifts
        for kind, engine in engines.items():
            decoder, routing, cache = engine.decoder, engine.registry.routing(specs, engine.device), caches[kind]
            results[kind]["prefill"].append(best(lambda: decoder.prefill(cache, 0, ids, torch.full((ROWS,), CONTEXT), routing), 3))
            results[kind]["decode"].append(best(lambda: decoder.decode(cache, ids[:, -1], torch.full((ROWS,), CONTEXT), routing)))
    for step in ("decode", "prefill"):
        plain, dora = min(results["plain"][step]), min(results["dora"][step])
        print(f"{step}: {ROWS} rows over {ADAPTERS} adapters, plain LoRA {plain * 1e3:.2f} ms, DoRA {dora * 1e3:.2f} ms: "
              f"DoRA / plain {dora / plain:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
