"""Full fine-tuning, the baseline a LoRA run is weighed against (`lorakit train --full`, `finetune: full`).

The same data, loop, schedule, checkpoints and eval as a LoRA run (train/run.py prepares the rows and
hands them here); what differs is what is trained, kept and written:

  trained   every parameter of the base, embeddings and output head included (what transformers'
            Trainer trains), held as fp32 master weights whatever model.dtype says, the forward under
            bf16 autocast: 16 bytes a parameter with AdamW, as `lorakit estimate` counts full fine-tuning
  kept      checkpoints hold the fp32 model (model.safetensors through safetensors' save_model, which
            writes tied weights once), so a resume is exact
  written   output_dir/model: a transformers model directory (save_pretrained: config, safetensors,
            generation config, the tokenizer), cast back to model.dtype, written atomically
  scored    the base before training (training overwrites it) and the saved model after, both in
            model.dtype, for the same before/after table a LoRA run prints
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from lorakit.config import TaskType, settings
from lorakit.data import batches
from lorakit.errors import LorakitError
from lorakit.infer.scoring import score_samples
from lorakit.io import atomic_directory
from lorakit.lora.routing import BASE
from lorakit.models.load import load_model
from lorakit.quant.heap import release_freed_memory
from lorakit.tasks.order_json import DEFAULT_MAX_NEW_TOKENS
from lorakit.train.distributed import Replicas
from lorakit.train.loop import train
from lorakit.train.outputs import run_figures, write_run_config, write_summary
from lorakit.train.run import before_after_table
from lorakit.train.step import evaluate_loss

if TYPE_CHECKING:
    from lorakit.train.config import RunConfig
    from lorakit.train.run import PreparedData

LORA, FULL = "lora", "full"
FINETUNE_MODES = (LORA, FULL)
MODEL_DIR = "model"
"""Where a full run's model goes in output_dir (a LoRA run's goes in output_dir/adapter)."""
CHECKPOINT_WEIGHTS = "model.safetensors"


def full_problems(config: RunConfig, default_lora: Any) -> list[str]:
    """Why `config` cannot run as full fine-tuning (empty if it can, or if it is a LoRA run).
    `default_lora`: the lora section's defaults, to tell the settings a user changed."""
    mode = config.train.finetune
    if mode not in FINETUNE_MODES:
        return [f"finetune must be {' or '.join(FINETUNE_MODES)} (got {mode!r})"]
    if mode != FULL:
        return []
    found = []
    if config.quant.enabled:
        found.append(f"--full trains every weight in fp32, which a {config.quant.quantization} base cannot hold; "
                     "drop quantization, or drop --full to train QLoRA")
    if config.lora.task_type != TaskType.CAUSAL_LM.value:
        found.append(f"--full trains causal LMs only (task_type is {config.lora.task_type}); drop --full or task_type")
    elif changed := adapter_settings(config.lora, default_lora):
        found.append(f"{', '.join(changed)} configure{'s' if len(changed) == 1 else ''} a LoRA adapter, which --full does "
                     "not train; drop them or drop --full")
    if config.train.loraplus_lr_ratio:
        found.append("loraplus_lr_ratio sets LoRA+'s learning rate of the B matrices, which --full does not have; drop it or drop --full")
    if config.train.fsdp:
        found.append("fsdp shards a frozen base beside a replicated adapter; with --full drop fsdp")
    return found


def adapter_settings(lora: Any, default_lora: Any) -> list[str]:
    """The lora section's settings that differ from their defaults (adapter-only flags)."""
    return [f.name for f in settings(type(lora)) if getattr(lora, f.name) != getattr(default_lora, f.name)]


class FullModel(nn.Module):
    """The whole transformers model as the loop's trainable: the door LoraModel offers (get_base_model,
    `.model`, forward) plus how a checkpoint keeps it and how the result is written."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def get_base_model(self) -> nn.Module:
        return self.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def save_checkpoint_weights(self, directory: Path) -> None:
        """Every weight at its training dtype, tied ones once (inside the checkpoint's atomic directory)."""
        save_safetensors_model(self.model, str(Path(directory) / CHECKPOINT_WEIGHTS))

    def load_checkpoint_weights(self, directory: Path) -> None:
        """The weights a checkpoint holds, every name and shape checked by safetensors before any copy."""
        path = Path(directory) / CHECKPOINT_WEIGHTS
        if not path.is_file():
            raise LorakitError(f"{directory} holds no {CHECKPOINT_WEIGHTS}: it is a LoRA checkpoint; resume it without --full")
        try:
            load_safetensors_model(self.model, str(path), strict=True)
        except RuntimeError as err:
            problem = str(err).strip().splitlines()[0]
            raise LorakitError(f"{path} does not fit this model ({problem}); resume with the model it was trained from") from None

    def save_pretrained(self, directory: str | Path) -> None:
        """A transformers model directory (safetensors) with the tokenizer, written atomically."""
        with atomic_directory(directory) as staging:
            self.model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)


def run_full(config: RunConfig, data: PreparedData, tokenizer: Any, train_rows: list, eval_rows: list, replicas: Replicas,
             output_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Fine-tune every weight of the base on the prepared rows; returns the summary (also written)."""
    if replicas.distributed:
        raise LorakitError("--full runs in one process (its gradients are the whole model); drop --nproc / torchrun")
    hf_model = load_model(config.model.name, dtype=config.model.dtype).to(replicas.device)
    save_dtype, use_cache = hf_model.dtype, getattr(hf_model.config, "use_cache", None)
    scored = data.shipped_task and config.train.compare_base
    before = score_model(hf_model, tokenizer, data, eval_rows, config) if scored else None
    hf_model.float().requires_grad_(True)  # fp32 master weights; autocast computes in bf16
    release_freed_memory()  # the bf16 weights and the scoring engine's buffers, before training's peak
    model = FullModel(hf_model, tokenizer)
    trainable = sum(p.numel() for p in hf_model.parameters())
    log(f"full fine-tuning: all {trainable:,} parameters trainable, fp32 master weights, saved as {str(save_dtype).removeprefix('torch.')}")

    output_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(output_dir, config)
    result = train(model, train_rows, eval_rows, config.train, log=log, replicas=replicas, save_final=False)
    summary: dict = {"finetune": FULL, "trainable_parameters": trainable, "steps": result.steps,
                     "tokens_per_second": round(result.tokens_per_second, 1), "model": str(output_dir / MODEL_DIR)}
    if result.interrupted:
        return summary
    hf_model.to(save_dtype)  # training is over: the saved (and scored) model is in the base's dtype
    if use_cache is not None:
        hf_model.config.use_cache = use_cache  # gradient checkpointing turned it off; generation wants it
    model.save_pretrained(output_dir / MODEL_DIR)
    if before is not None:
        summary["before"], summary["after"] = before, score_model(hf_model, tokenizer, data, eval_rows, config)
        log(before_after_table(summary["before"], summary["after"], "fine-tuned"))
    elif result.eval_loss is not None:
        summary["eval_loss"] = result.eval_loss
        log(f"eval loss {result.eval_loss:.4f}")
    summary.update(run_figures(result, output_dir / MODEL_DIR))
    return write_summary(output_dir, summary, result, log, config.train.compare_with)


def score_model(model: nn.Module, tokenizer: Any, data: PreparedData, eval_rows: list, config: RunConfig) -> dict:
    """Exact match by greedy generation and eval loss of a plain transformers model on the held-out records."""
    (score,) = score_samples(model, tokenizer, data.eval, {"model": BASE}, config.data.template, DEFAULT_MAX_NEW_TOKENS)
    loss = evaluate_loss(model, batches(eval_rows, config.train.per_device_eval_batch_size, shuffle=False), config.train.bf16)
    return {"exact_match": score.exact_match, "eval_loss": loss}
