"""How exact is `lorakit merge` on a QLoRA adapter? lorakit's dequantize-and-merge against peft's merge.

    .venv/bin/python bench/merge_exactness.py                   # default model, 20 steps on the repo's docs
    .venv/bin/python bench/merge_exactness.py --steps 2 --seq-len 64   # smoke run

Trains a short adapter on the nf4 default model (real text: the repository's markdown files), then
compares merged models against the unmerged one over lorakit's probe prompts:
  - lorakit: dequantize (exactly, fp32) + merge in fp32, written as bf16 and as fp32;
  - lorakit --requantize nf4 (what re-quantizing the merged weights costs);
  - the fp32 merge against the unmerged model computed in fp32 (the merge's own exactness, without
    bf16 compute noise on either side);
  - peft's merge_and_unload on the same quantized base (it re-quantizes to nf4), and peft's unmerged
    model against lorakit's (the noise floor between the two implementations).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, get_peft_model, load_model, load_tokenizer, prepare_model_for_kbit_training
from lorakit.lora.model import LoraModel
from lorakit.merge import merge_to_directory
from lorakit.models.load import resolve_model_dir
from lorakit.quant.config import QuantConfig
from lorakit.quant.guard import keep_4bit_trainable
from lorakit.quant.load import bnb_config
from lorakit.quant.record import write_quant_record
from lorakit.quant.requantize import PROBE_PROMPTS, logit_error, probe_inputs, prompt_logits
from lorakit.weights.kinds import is_4bit

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
NAMES = {"lorakit_dense_bf16": "lorakit: dequantize + merge in fp32, write bf16",
         "lorakit_dense_fp32": "lorakit: dequantize + merge in fp32, write fp32",
         "lorakit_dense_fp32_vs_fp32_unmerged": "lorakit fp32 merge vs the unmerged model computed in fp32 (merge exactness)",
         "lorakit_requantize_nf4": "lorakit --requantize nf4",
         "peft_merge_and_unload": "peft merge_and_unload (re-quantizes to nf4)",
         "peft_unmerged_vs_lorakit_unmerged": "(noise floor: peft unmerged vs lorakit unmerged)"}


def error_entry(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict:
    error = logit_error(reference, candidate)
    return {"max": error.max_abs, "mean": error.mean_abs}


def train_adapter(model_dir: str, tokenizer, args: argparse.Namespace, adapter: Path) -> tuple[LoraModel, list[float]]:
    """A short r=args.r adapter on the nf4 base, trained on the repository's markdown and saved with its
    record; returns the trained (unmerged) model and its losses."""
    text = "\n\n".join(p.read_text() for p in sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").glob("*.md")))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    rows = [ids[i : i + args.seq_len] for i in range(0, len(ids) - args.seq_len, args.seq_len)][: args.batch * args.steps] or [ids[: args.seq_len]]
    torch.manual_seed(0)
    model = get_peft_model(prepare_model_for_kbit_training(load_model(model_dir, quantization="nf4")),
                           LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for step in range(args.steps):
        chunk = rows[(step * args.batch) % len(rows):][: args.batch] or rows[: args.batch]
        batch = torch.stack(chunk)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.save_pretrained(adapter)
    write_quant_record(adapter, QuantConfig("nf4"))
    return model, losses


def fp32_unmerged_logits(model_dir: str, adapter: Path, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    """The unmerged model on the same nf4 codes, with every matmul and unquantized layer in fp32."""
    base = load_model(model_dir, quantization="nf4")
    keep_4bit_trainable(base)
    for module in base.modules():
        if is_4bit(getattr(module, "weight", None)):
            module.compute_dtype = torch.float32
    for param in base.parameters():
        if not is_4bit(param):
            param.data = param.data.float()
    return prompt_logits(LoraModel.from_pretrained(base, adapter), probes)


def peft_logits(model_dir: str, adapter: Path, probes: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(unmerged, merge_and_unload) logits of peft on the same quantized base."""
    base = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(model_dir)), quantization_config=bnb_config(QuantConfig("nf4")),
                                                dtype=torch.bfloat16, device_map={"": "cpu"})
    keep_4bit_trainable(base)  # the same dequantize-then-matmul path as lorakit's reference
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter))
    unmerged = prompt_logits(peft_model, probes)
    merged = peft_model.merge_and_unload()
    keep_4bit_trainable(merged)
    return unmerged, prompt_logits(merged, probes)


def measure(args: argparse.Namespace) -> dict:
    model_dir = str(resolve_model_dir(args.model))
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-merge-"))
    tokenizer = load_tokenizer(model_dir)
    adapter = work / "adapter"
    model, losses = train_adapter(model_dir, tokenizer, args, adapter)
    probes = probe_inputs(tokenizer, PROBE_PROMPTS)
    reference = prompt_logits(model, probes)  # lorakit, unmerged, on the quantized base it was trained on
    del model

    result = {"train_losses": losses, "probe_tokens": sum(p.shape[1] for p in probes)}
    for dtype in ("bf16", "fp32"):
        report = merge_to_directory(model_dir, adapter, work / f"merged-{dtype}", dtype=dtype, prompts=PROBE_PROMPTS)
        result[f"lorakit_dense_{dtype}"] = {"max": report.error.max_abs, "mean": report.error.mean_abs}
    report = merge_to_directory(model_dir, adapter, work / "merged-nf4", requantize="nf4", prompts=PROBE_PROMPTS)
    result["lorakit_requantize_nf4"] = {"max": report.error.max_abs, "mean": report.error.mean_abs}

    merged32 = AutoModelForCausalLM.from_pretrained(str(work / "merged-fp32"), dtype=torch.float32)
    result["lorakit_dense_fp32_vs_fp32_unmerged"] = error_entry(fp32_unmerged_logits(model_dir, adapter, probes),
                                                                prompt_logits(merged32, probes))
    peft_unmerged, peft_merged = peft_logits(model_dir, adapter, probes)
    result["peft_unmerged_vs_lorakit_unmerged"] = error_entry(reference, peft_unmerged)
    result["peft_merge_and_unload"] = error_entry(reference, peft_merged)
    result["peft_merge_and_unload_vs_peft_unmerged"] = error_entry(peft_unmerged, peft_merged)
    return result


def report(result: dict) -> list[str]:
    lines = ["## Merge quality (default model, nf4 base, adapter trained on the repo's docs)",
             f"adapter training loss: {result['train_losses'][0]:.3f} -> {result['train_losses'][-1]:.3f}; "
             f"{result['probe_tokens']} probe tokens; reference: lorakit's unmerged model on the nf4 base (bf16 compute, as trained),",
             "so a merged model evaluated in fp32 also differs by the reference's own bf16 rounding", "",
             "| merged model | max abs logit diff | mean abs |", "|---|---|---|"]
    lines += [f"| {name} | {result[key]['max']:.4f} | {result[key]['mean']:.5f} |" for key, name in NAMES.items()]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' or a model directory")
    parser.add_argument("--steps", type=int, default=20, help="adapter training steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--json", default="", help="write every number here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    print("\n".join(report(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
