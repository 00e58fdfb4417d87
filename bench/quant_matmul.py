"""Quantized base-weight matmuls (kernels/quant_matmul.py) against bf16, at the default model's shapes.

Prints, in one process:
  1. quality: a random (1536, 576) and (576, 1536) weight in each format against bf16: the weight's
     and a matmul's error (max |err| / max |bf16|, mean |err| / mean |bf16|), for gaussian rows of x
     and for rows with four outlier channels (x 30: the kernel's int8 rounding of x per block);
  2. decode speed: bf16 F.linear, bf16 prepacked oneDNN (what infer/packed.py runs), the int8 and
     4-bit kernels at B=1 and B=16 for q/k/v, gate/up, down and the head; best of --rounds, the
     methods interleaved within each round; ratios to F.linear and GB/s of weight read;
  3. prefill: the integer kernel against dequantize + oneDNN as the rows grow (where DECODE_ROWS sits).

Each method cycles through copies of its weight totalling >= --pool MB of bf16, so a call reads its
weight from beyond the core's L2 as a decode step does (the model's weights are read once a token).
The machine may be shared and noisy: compare the ratios of one run, not absolutes across runs.

    nice -n 0 .venv/bin/python bench/quant_matmul.py [--rounds 15] [--pool 96]
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from lorakit.kernels import quant_matmul as qm

SHAPES = {"qkv 576->1728": (1728, 576), "gate/up 576->3072": (3072, 576), "down 1536->576": (576, 1536),
          "head 576->49152": (49152, 576)}
FORMATS: dict[str, Callable[[torch.Tensor], qm.QuantWeight]] = {
    "int8": lambda w: qm.quantize_int8(w), "q4_0/32": lambda w: qm.quantize_4bit(w, 32), "q4_0/64": lambda w: qm.quantize_4bit(w, 64)}


def quality() -> None:
    print("quality against bf16 (err = |format - bf16|; max: max err / max |bf16|, mean: mean err / mean |bf16|)")
    generator = torch.Generator().manual_seed(0)
    for n, k in ((1536, 576), (576, 1536)):
        w = (torch.randn(n, k, generator=generator) * 0.02).bfloat16()
        x = torch.randn(16, k, generator=generator)
        spiky = x.clone()
        spiky[:, torch.randperm(k, generator=generator)[:4]] *= 30  # a few outlier channels, as in LLM activations
        inputs = {"x": x.bfloat16(), "x with outliers": spiky.bfloat16()}
        for name, quantize in FORMATS.items():
            q = quantize(w)
            werr = (qm.dequantize(q).float() - w.float()).abs()
            line = (f"  W ({n}, {k}) {name:8s} weight max {float(werr.max() / w.float().abs().max()):.4f} "
                    f"mean {float(werr.mean() / w.float().abs().mean()):.4f}")
            for label, rows in inputs.items():
                exact = F.linear(rows.float(), w.float())
                oerr = (qm.matmul(rows, q).float() - exact).abs()
                line += f" | {label} @ W^T max {float(oerr.max() / exact.abs().max()):.4f} mean {float(oerr.mean() / exact.abs().mean()):.4f}"
            print(line + f" | {q.nbytes / (n * k * 2):.3f}x bf16's bytes")


def _best(methods: dict[str, list[Callable[[], object]]], rounds: int) -> dict[str, float]:
    """Seconds per call of each method: every call timed alone, each copy's best of `rounds`, averaged
    over the copies (a call preempted on a shared machine is then dropped, not averaged in); the
    methods interleaved in each round."""
    best = {name: [float("inf")] * len(calls) for name, calls in methods.items()}
    for _ in range(rounds):
        for name, calls in methods.items():
            for i, call in enumerate(calls):
                start = time.perf_counter()
                call()
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: sum(times) / len(times) for name, times in best.items()}


def decode(rounds: int, pool_mb: float) -> None:
    print(f"\ndecode: microseconds per call (best of {rounds}), ratio = F.linear time / method time, GB/s of weight read")
    for label, (n, k) in SHAPES.items():
        copies = max(1, round(pool_mb * 1e6 / (n * k * 2)))
        weights = [torch.randn(n, k).bfloat16() * 0.02 for _ in range(copies)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
        quantized = {name: [quantize(w) for w in weights] for name, quantize in FORMATS.items()}
        nbytes = {"bf16 F.linear": n * k * 2, "bf16 oneDNN packed": n * k * 2,
                  **{name: qs[0].nbytes for name, qs in quantized.items()}}
        for rows in (1, 16):
            x = torch.randn(rows, k).bfloat16()
            methods = {"bf16 F.linear": [partial(F.linear, x, w) for w in weights],
                       "bf16 oneDNN packed": [partial(torch.ops.mkldnn._linear_pointwise, x, p, None, "none", [], "") for p in packed]}
            for name, qs in quantized.items():
                methods[name] = [partial(qm.matmul, x, q) for q in qs]
            times = _best(methods, rounds)
            base = times["bf16 F.linear"]
            print(f"  {label:18s} B={rows:<2d} ({copies} copies) " + "  ".join(
                f"{name} {t * 1e6:.0f}us x{base / t:.2f} {nbytes[name] / t / 1e9:.1f}GB/s" for name, t in times.items()))


def prefill(rounds: int) -> None:
    print("\nprefill: the integer kernel against dequantize + oneDNN (gate/up 576->3072), microseconds per call")
    n, k = SHAPES["gate/up 576->3072"]
    w = torch.randn(n, k).bfloat16() * 0.02
    ops = qm.load()
    for name, quantize in FORMATS.items():
        q = quantize(w)
        linear = ops.quant_linear_int8 if q.format == "int8" else ops.quant_linear_q4
        dequantize = ops.quant_dequantize_int8 if q.format == "int8" else ops.quant_dequantize_q4
        cells = []
        for rows in (16, 64, 128, 256, 512):
            x = torch.randn(rows, k).bfloat16()
            times = _best({"kernel": [partial(linear, x, q.data, q.scales, n, q.block, None)],
                           "dequantize+oneDNN": [lambda: F.linear(x, dequantize(q.data, q.scales, n, k, q.block))]}, rounds)
            cells.append(f"B={rows} {times['kernel'] * 1e6:.0f} vs {times['dequantize+oneDNN'] * 1e6:.0f}")
        print(f"  {name:8s} kernel vs dequantize+oneDNN: " + ", ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pool", type=float, default=96.0, help="MB of bf16 weights each method cycles through")
    args = parser.parse_args()
    if qm.load() is None:
        raise SystemExit("lorakit's C++ kernels did not build here; nothing to measure")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels: {qm.isa()}")
    quality()
    decode(args.rounds, args.pool)
    prefill(args.rounds)


if __name__ == "__main__":
    main()
