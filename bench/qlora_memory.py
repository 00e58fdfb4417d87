"""QLoRA vs bf16 LoRA, side by side in one run: weight bytes, peak RSS, throughput.

    .venv/bin/python bench/qlora_memory.py                       # default model, bf16 vs nf4
    .venv/bin/python bench/qlora_memory.py --llama-1b            # + a ~1.1B Llama with random weights,
                                                                 #   against what `lorakit estimate` predicts
    .venv/bin/python bench/qlora_memory.py --steps 1 --seq-len 128 --llama-1b --layers 4   # smoke run

Each configuration trains in its own subprocess, one after another (two at once would share the CPU
cores and each other's memory), so its peak RSS is its own; the parent never imports torch. A child
reports two peaks, read from /proc/self/status: while loading (VmHWM after the load), and while
training (VmHWM after resetting it through /proc/self/clear_refs once the model is loaded); the
process peak is the larger. `lorakit estimate` predicts all three. (The kernel's ru_maxrss from wait4,
kept in the JSON, equals the training peak: the reset clears the same high-water mark.)
The training step is lorakit's (`lorakit.train.step.batch_loss_sum`: bf16 autocast, chunked head
loss). Rows are packed: every token is a useful one. The merge's exactness has its own benchmark,
bench/merge_exactness.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from malloc import return_large_frees_to_os  # bench/malloc.py: ctypes only, the parent stays torch-free

ROOT = Path(__file__).resolve().parents[1]
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                rms_norm_eps=1e-5, rope_theta=10000.0)
TARGETS_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ================================================================================================
# children: each runs in a fresh interpreter
# ================================================================================================
def proc_status(field: str) -> int:
    """A /proc/self/status value in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def linear_weight_bytes(model) -> dict:
    """Bytes held by the weights of every linear layer bitsandbytes would quantize (all but the head),
    quantization constants included, next to what those weights take in bf16."""
    import torch

    from lorakit.lora.targets import output_head_names
    from lorakit.weights.kinds import WeightKind, weight_kind

    heads = output_head_names(model)
    held = bf16 = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        kind = weight_kind(weight)
        if name in heads or id(weight) in seen or not (isinstance(module, torch.nn.Linear) or kind is not WeightKind.DENSE):
            continue
        seen.add(id(weight))
        if kind is WeightKind.NF4:
            state = weight.quant_state
            numel = state.shape[0] * state.shape[1]
            tensors = [weight.data, state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code, state.offset]
            held += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
        elif kind is WeightKind.INT8:
            numel = weight.numel()
            scb = getattr(weight, "SCB", None)
            held += weight.numel() + (scb.numel() * 4 if scb is not None else weight.shape[0] * 4)
        else:
            numel = weight.numel()
            held += numel * weight.element_size()
        bf16 += numel * 2
    return {"held": held, "bf16": bf16}


def make_batch(rows: int, seq_len: int, vocab: int, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq_len).expand(rows, -1).contiguous(),
            "seq_lens": [[seq_len]] * rows, "padding": [0] * rows}


def child_train(args: argparse.Namespace) -> dict:
    import torch

    from lorakit import LoraConfig, get_peft_model, load_model, prepare_model_for_kbit_training

    torch.manual_seed(0)
    started = time.perf_counter()
    if args.quant == "bf16":
        model = load_model(args.model_dir, dtype=torch.bfloat16)
        if args.checkpointing == "on":
            prepare_model_for_kbit_training(model, checkpoint_every_n_layers=args.checkpoint_every)
    else:
        model = load_model(args.model_dir, quantization=args.quant)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing != "off",
                                        checkpoint_every_n_layers=args.checkpoint_every)
    weights = linear_weight_bytes(model)
    targets = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    load_s = time.perf_counter() - started
    load_peak, after_load = proc_status("VmHWM"), proc_status("VmRSS")
    reset_ok = reset_peak_rss()

    if args.malloc == "mmap":
        return_large_frees_to_os()
    step_fn, step_name = training_step(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    model.train()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        batch = make_batch(args.batch, args.seq_len, vocab, seed=step)
        t0 = time.perf_counter()
        loss = step_fn(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        losses.append(loss)
        if step >= args.warmup:
            times.append(elapsed)
    tokens = args.batch * args.seq_len
    return {
        "config": args.quant, "checkpointing": args.checkpointing, "malloc": args.malloc, "step": step_name, "threads": torch.get_num_threads(),
        "load_s": load_s, "linear_weight_bytes": weights["held"], "linear_weight_bytes_bf16": weights["bf16"],
        "trainable_params": trainable, "rss_after_load": after_load, "load_peak_rss": load_peak,
        "train_peak_rss": proc_status("VmHWM") if reset_ok else None, "peak_reset": reset_ok,
        "step_s": times, "tokens_per_s": tokens * len(times) / sum(times) if times else None, "losses": losses,
    }


def training_step(model):
    """(batch -> loss after backward, name): lorakit's training step."""
    from lorakit.lora.model import unwrap_model
    from lorakit.train.step import batch_loss_sum, training_paths

    def step(batch):
        # backward stays inside the packed-attention and lean-kernel contexts, as in lorakit's loop:
        # with checkpointing on, the decoder layers run again there and must take the same attention
        # and kernel paths as in the forward
        with training_paths(unwrap_model(model)):
            loss_sum, count = batch_loss_sum(model, batch, bf16=True)
            (loss_sum / count).backward()
        return float(loss_sum) / count
    return step, "lorakit.train.step.batch_loss_sum (bf16 autocast, chunked head loss)"


def child_make_llama(args: argparse.Namespace) -> dict:
    """Save a Llama with random weights in bf16 (once; reused by later runs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = Path(args.model_dir)
    if (target / "config.json").is_file():
        return {"model_dir": str(target), "created": False}
    values = dict(LLAMA_1B)
    if args.layers:
        values["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    config = LlamaConfig(**values, dtype="bfloat16")
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    staging = target.with_name(target.name + ".tmp")
    model.save_pretrained(staging, safe_serialization=True)
    os.replace(staging, target)
    return {"model_dir": str(target), "created": True, "params": sum(p.numel() for p in model.parameters())}


# ================================================================================================
# parent
# ================================================================================================
def run_child(argv: list[str]) -> dict:
    """Run one child to completion; adds its own peak RSS as the kernel reports it (wait4's ru_maxrss).

    The parent never imports torch, so a child's ru_maxrss is not inflated by the parent's pages."""
    import tempfile

    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    with tempfile.TemporaryFile(mode="w+") as errors:
        proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"child {' '.join(argv[:4])} failed ({proc.returncode}):\n{errors.read()[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    if isinstance(result, dict):
        result["wait4_maxrss"] = usage.ru_maxrss * 1024
    return result


def gb(value) -> str:
    return f"{value / 1e9:.2f} GB" if value else "n/a"


def train_configs(model_dir: str, args: argparse.Namespace) -> list[dict]:
    results = []
    for quant in args.configs:
        checkpointing = args.checkpointing if args.checkpointing != "auto" else ("on" if quant != "bf16" else "off")
        argv = ["--child", "train", "--model-dir", model_dir, "--quant", quant, "--checkpointing", checkpointing, "--checkpoint-every", str(args.checkpoint_every), "--malloc", args.malloc,
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                "--r", str(args.r), "--target-modules", *args.target_modules]
        print(f"  running {quant} (checkpointing {checkpointing}) ...", flush=True)
        results.append(run_child(argv))
    return results


def estimate_for(model_dir: str, args: argparse.Namespace) -> dict | None:
    argv = ["--child", "estimate", "--model-dir", model_dir, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
            "--r", str(args.r), "--malloc", args.malloc, "--target-modules", *args.target_modules]
    try:
        return run_child(argv)
    except RuntimeError as err:
        print(f"  (no estimate: {str(err).splitlines()[-1]})")
        return None


def child_estimate(args: argparse.Namespace) -> dict:
    from lorakit.estimate import estimate

    targets = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    table = estimate(args.model_dir, r=args.r, target_modules=targets, seq_len=args.seq_len, batch=args.batch, allocator=args.malloc)
    return {name: {"peak": column.peak_bytes, "training": column.training_peak, "loading": column.loading_peak}
            for name, column in table.columns.items()}


def child_resolve(args: argparse.Namespace) -> dict:
    from lorakit.models.load import resolve_model_dir

    return {"model_dir": str(resolve_model_dir(args.model))}


def report_training(title: str, results: list[dict], predicted: dict | None) -> list[str]:
    lines = [f"\n## {title}", f"step: {results[0]['step']}; threads: {results[0]['threads']}; allocator: {results[0]['malloc']}", "",
             "| config | ckpt | linear weights | vs bf16 | useful tokens/s | load peak RSS | train peak RSS | process peak | estimate (load / train / process) |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_name = {r["config"]: r for r in results}
    for r in results:
        column = {"bf16": "lora", "nf4": "qlora"}.get(r["config"])
        guess = predicted.get(column) if predicted and column else None
        ratio = r["linear_weight_bytes"] / r["linear_weight_bytes_bf16"]
        process = max(r["load_peak_rss"], r["train_peak_rss"] or 0)
        r["process_peak_rss"] = process
        off = (f"{gb(guess['loading'])} / {gb(guess['training'])} / {gb(guess['peak'])} ({(guess['peak'] / process - 1) * 100:+.0f}%)"
               if guess else "n/a")
        lines.append(f"| {r['config']} | {r['checkpointing']} | {gb(r['linear_weight_bytes'])} | {ratio:.3f}x | {r['tokens_per_s']:.0f} | "
                     f"{gb(r['load_peak_rss'])} | {gb(r['train_peak_rss'])} | {gb(process)} | {off} |")
    if "bf16" in by_name and "nf4" in by_name:
        a, b = by_name["bf16"], by_name["nf4"]
        lines += ["", f"nf4 linear weights / bf16: {b['linear_weight_bytes'] / b['linear_weight_bytes_bf16']:.3f}x (target <= 0.27x)",
                  f"nf4 train peak RSS / bf16: {b['train_peak_rss'] / a['train_peak_rss']:.2f}x (target < 1); "
                  f"process peak (load included): {b['process_peak_rss'] / a['process_peak_rss']:.2f}x",
                  f"nf4 throughput / bf16: {b['tokens_per_s'] / a['tokens_per_s']:.2f}x (target >= 0.6x)"]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model for the first table ('default' or a directory)")
    parser.add_argument("--configs", nargs="+", default=["bf16", "nf4"], help="bf16 | nf4 | fp4 | int8 (default bf16 nf4)")
    parser.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"],
                        help="auto: on for quantized bases (prepare_model_for_kbit_training), off for bf16")
    parser.add_argument("--checkpoint-every", type=int, default=1, help="checkpoint every n-th decoder layer (default 1: all)")
    parser.add_argument("--malloc", default="glibc", choices=["glibc", "mmap"],
                        help="glibc: the allocator as `lorakit train` leaves it (default); mmap: fix glibc's mmap threshold "
                             "at 1 MB (bench/malloc.py), so freed activations go back to the OS (less RSS, slower)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--target-modules", nargs="+", default=TARGETS_DEFAULT)
    parser.add_argument("--skip-default", action="store_true", help="skip the default-model table")
    parser.add_argument("--llama-1b", action="store_true", help="also run the ~1.1B random-weight Llama")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers of that Llama (0: 22, its real depth)")
    parser.add_argument("--llama-dir", default="", help="where to keep it (default: $LORAKIT_CACHE/bench/llama-1.1b-random[-N])")
    parser.add_argument("--json", default="", help="write every number here too")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--quant", default="bf16", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        sys.path.insert(0, str(ROOT / "src"))
        import logging

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        children = {"train": child_train, "make-llama": child_make_llama, "estimate": child_estimate, "resolve": child_resolve}
        result = children[args.child](args)
        print(json.dumps(result))
        return 0

    report, everything = [f"# bench/qlora_memory.py  (batch {args.batch} x {args.seq_len}, r={args.r}, {' '.join(args.target_modules)})"], {}
    if not args.skip_default:
        model_dir = run_child(["--child", "resolve", "--model", args.model])["model_dir"]
        print(f"{args.model}: {model_dir}", flush=True)
        results = train_configs(model_dir, args)
        predicted = estimate_for(model_dir, args)
        everything["default"] = {"results": results, "estimate": predicted}
        report += report_training(f"{args.model} model", results, predicted)
    if args.llama_1b:
        suffix = f"-{args.layers}" if args.layers else ""
        cache = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))
        llama_dir = args.llama_dir or str(cache / "bench" / f"llama-1.1b-random{suffix}")
        print(f"llama 1.1B (random weights): {llama_dir}", flush=True)
        run_child(["--child", "make-llama", "--model-dir", llama_dir, "--layers", str(args.layers)])
        results = train_configs(llama_dir, args)
        predicted = estimate_for(llama_dir, args)
        everything["llama_1b"] = {"results": results, "estimate": predicted, "layers": args.layers or 22}
        report += report_training(f"Llama ~1.1B, random weights ({args.layers or 22} layers)", results, predicted)
    print("\n".join(report))
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
