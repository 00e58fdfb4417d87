"""`lorakit train` end to end: config -> data -> model -> adapter, with a before/after report.

Order matters for "nothing lost on failure": every check that can fail on the user's input (config,
data files, empty data sets) runs before the model is loaded and before anything is written."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from lorakit.data import batches, load_records, pack, tokenize_samples, train_eval_split
from lorakit.data.formats import Sample, parse_record
from lorakit.data.packing import pad_rows
from lorakit.data.records import Records
from lorakit.config import TaskType
from lorakit.errors import LorakitError
from lorakit.infer.scoring import score_samples
from lorakit.lora.routing import BASE
from lorakit.tasks.order_json import DEFAULT_MAX_NEW_TOKENS, train_eval_records
from lorakit.lora.model import get_peft_model
from lorakit.models.load import load_model, load_tokenizer, resolve_model_dir
from lorakit.quant.load import load_quantized
from lorakit.quant.prepare import prepare_model_for_kbit_training
from lorakit.quant.record import write_quant_record
from lorakit.train.config import RunConfig
from lorakit.train.distributed import init_distributed, shard_base
from lorakit.train.loop import train
from lorakit.train.outputs import check_output_dir, run_figures, write_run_config, write_summary
from lorakit.train.step import evaluate_loss, forward_loss


@dataclass
class PreparedData:
    train: list[Sample]
    eval: list[Sample]
    shipped_task: bool


def prepare_data(config: RunConfig) -> PreparedData:
    """Read and validate the records (no tokenizer, no model): empty or broken data fails here."""
    d = config.data
    if not d.path:
        train_raw, eval_raw = train_eval_records(d.task_train_examples, d.task_eval_examples)
        train = _records_from_dicts(train_raw)
        return PreparedData(train, _records_from_dicts(eval_raw), shipped_task=True)
    records: Records = load_records(d.path, d.format, d.on_bad_record)
    if d.eval_path:
        held: list[Sample] = load_records(d.eval_path, d.format, d.on_bad_record).samples
        train = records.samples
    else:
        train, held = train_eval_split(records.samples, eval_fraction=d.eval_fraction, seed=config.train.seed)
    if not train:
        raise LorakitError(f"no training records left in {d.path} after holding out the eval split; lower eval_fraction or add data")
    return PreparedData(train, held, shipped_task=False)


def _records_from_dicts(raw: list[dict]) -> list[Sample]:
    return [parse_record(r, f"shipped task #{i}", "alpaca") for i, r in enumerate(raw)]


def packs_within_examples(model_name: str, log=print) -> bool:
    """Whether packed rows keep each example's attention to itself for this model: only models whose
    attention runs through transformers' attention interface (train/attention.py routes it per example).
    Others (StableLM, Falcon, MPT, ...) would attend across the examples of a row, so they get one
    example per row, with a notice."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model_dir(model_name))
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is None or getattr(model_class, "_supports_attention_backend", False):
        return True
    log(f"data: {model_class.__name__} attends outside transformers' attention interface, so packed rows would let "
        "examples see each other; one example per row instead")
    return False


def run_training(config: RunConfig, log=print) -> dict:
    """Train an adapter as `config` says; returns a summary (also printed)."""
    output_dir = check_output_dir(config)
    if config.lora.task_type == TaskType.SEQ_CLS.value:
        from lorakit.train.classify_run import run_classification  # its own job: records with labels, a classifier

        return run_classification(config, log)
    replicas = init_distributed()  # torchrun's processes (or this one alone); only rank 0 logs and writes
    log = log if replicas.is_main else (lambda *_: None)
    data = prepare_data(config)
    tokenizer = load_tokenizer(config.model.name)
    d = config.data
    train_examples, stats = tokenize_samples(data.train, tokenizer, d.max_seq_len, d.template, d.train_on_inputs)
    eval_examples, _ = tokenize_samples(data.eval, tokenizer, d.max_seq_len, d.template, d.train_on_inputs) if data.eval else ([], None)
    if not train_examples:
        raise LorakitError("every training example was dropped during tokenization (nothing left to learn); check the data and max_seq_len")
    pad = tokenizer.pad_token_id
    packing = d.packing and packs_within_examples(config.model.name, log)
    train_rows, pack_stats = pack(train_examples, d.max_seq_len, pad, seed=config.train.seed) if packing else pad_rows(train_examples, d.max_seq_len, pad)
    eval_rows = (pack(eval_examples, d.max_seq_len, pad, seed=0) if packing else pad_rows(eval_examples, d.max_seq_len, pad))[0] if eval_examples else []
    log(f"data: {len(train_examples)} train / {len(eval_examples)} eval examples; {pack_stats}")
    if config.train.finetune == "full":  # every weight trained, not an adapter: same rows, same loop
        from lorakit.train.full import run_full  # here: full.py imports this module

        return run_full(config, data, tokenizer, train_rows, eval_rows, replicas, output_dir, log)

    model = load_base_model(config, replicas.device)
    torch.manual_seed(config.train.seed)
    peft_model = get_peft_model(model, config.lora)
    if config.lora.init_lora_weights == "eva":  # before the report: EVA may change the ranks
        eva_initialise(peft_model, train_rows, config, log)
    if replicas.is_main:
        peft_model.print_trainable_parameters()
    if config.train.fsdp and replicas.distributed:
        layers = shard_base(peft_model.model, replicas)
        log(f"fsdp: the frozen base of {layers} decoder layers sharded over {replicas.world_size} processes")

    summary: dict = {}
    output_dir.mkdir(parents=True, exist_ok=True)
    if replicas.is_main:
        write_run_config(output_dir, config)
    result = train(peft_model, train_rows, eval_rows, config.train, log=log, replicas=replicas)
    if not result.interrupted and replicas.is_main:
        write_quant_record(output_dir / "adapter", config.quant)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    summary.update(finetune="lora", trainable_parameters=trainable, steps=result.steps,
                   tokens_per_second=round(result.tokens_per_second, 1), adapter=str(output_dir / "adapter"))
    if result.interrupted or not replicas.is_main:
        return summary
    sharded = config.train.fsdp and replicas.distributed
    if sharded and data.shipped_task and config.train.compare_base:
        log("fsdp: the base is sharded, so the before/after scores are skipped; score with lorakit eval")
    if data.shipped_task and config.train.compare_base and not sharded:
        summary["before"], summary["after"] = score(peft_model, tokenizer, data, eval_rows, config)
        log(before_after_table(summary["before"], summary["after"]))
    elif result.eval_loss is not None:
        summary["eval_loss"] = result.eval_loss
        log(f"eval loss {result.eval_loss:.4f} (perplexity {math.exp(min(result.eval_loss, 50)):.2f})")
    summary.update(run_figures(result, output_dir / "adapter"))
    return write_summary(output_dir, summary, result, log, config.train.compare_with)


def eva_initialise(peft_model, train_rows, config: RunConfig, log) -> None:
    """EVA's data pass over the first train batches, in training order, as training runs them (peft's advice);
    every process computes the same from the same seeded batches."""
    from lorakit.lora.eva import Replay, eva_layers, initialize_lora_eva_weights

    t, started, passes = config.train, time.perf_counter(), []

    def forward(model, batch):
        passes.append(1)
        return forward_loss(model, batch, bf16=t.bf16)

    first_epoch = Replay(lambda: batches(train_rows, t.per_device_train_batch_size, seed=t.seed, epoch=0))
    lora = initialize_lora_eva_weights(peft_model, first_epoch, forward_fn=forward)
    ranks = [lora.layer_rank_alpha(path)[0] for path in eva_layers(peft_model, peft_model.active_adapter)]
    log(f"eva: lora_A from the train data's inputs ({len(passes)} batches, {time.perf_counter() - started:.1f} s); "
        f"{len(ranks)} layers, ranks {min(ranks)}-{max(ranks)} (r {lora.r})")


def load_base_model(config: RunConfig, device: torch.device | str = "cpu"):
    """The frozen base on `device`: bf16 (default) or quantized through bitsandbytes (its CUDA kernels on
    a GPU), ready for LoRA training."""
    quant = config.quant
    if not quant.enabled:
        return load_model(config.model.name, dtype=config.model.dtype).to(device)
    model = load_quantized(resolve_model_dir(config.model.name), quant, device)
    # QLoRA's recipe: checkpointing is on for a quantized base (its point is memory), whatever the train section says.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def score(model, tokenizer, data: PreparedData, eval_rows, config: RunConfig) -> tuple[dict, dict]:
    """Exact match by greedy generation and eval loss on the held-out records, of the base and of the
    trained adapter. The base is frozen, so it is scored after training too: both go through one engine
    run, every base row batched beside an adapter row."""
    base, adapter = score_samples(model, tokenizer, data.eval, {"base": BASE, "adapter": model.active_adapter},
                                  config.data.template, DEFAULT_MAX_NEW_TOKENS)
    eval_batches = lambda: batches(eval_rows, config.train.per_device_eval_batch_size, shuffle=False)  # noqa: E731
    with model.disable_adapter():
        base_loss = evaluate_loss(model, eval_batches(), config.train.bf16)
    adapter_loss = evaluate_loss(model, eval_batches(), config.train.bf16)
    return ({"exact_match": base.exact_match, "eval_loss": base_loss},
            {"exact_match": adapter.exact_match, "eval_loss": adapter_loss})


def before_after_table(before: dict, after: dict, after_label: str = "with adapter") -> str:
    rows = [("", "base model", after_label),
            ("exact match", f"{before['exact_match']:.1%}", f"{after['exact_match']:.1%}"),
            ("eval loss", f"{before['eval_loss']:.4f}", f"{after['eval_loss']:.4f}")]
    return "\n".join(f"  {a:<12} {b:>12} {c:>14}" for a, b, c in rows)
