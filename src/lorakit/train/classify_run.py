"""`lorakit train --task_type SEQ_CLS`: records -> labels -> tokenizer -> classifier -> LoRA -> train -> scores.

The same order as the causal run (train/run.py): the data and its labels are checked before any model
loads and before anything is written. The training loop is the shared one, with the classification
objective and length-grouped padded batches (no packing across examples)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lorakit.data.class_batches import ClassExample, LengthGroupedBatches, tokenize_class
from lorakit.data.classify import ClassRecord, LabelSet, load_class_records, parse_class_record
from lorakit.data.split import train_eval_split
from lorakit.errors import LorakitError
from lorakit.infer.classify import score_classifier, write_labels
from lorakit.lora.layer import ModulesToSave
from lorakit.lora.model import SEQ_CLS_HEAD_NAMES, get_peft_model
from lorakit.lora.routing import BASE
from lorakit.lora.targets import module_to_save_matches, name_matches
from lorakit.train.attention import register_dropout_sdpa
from lorakit.models.attention import supports_attention_interface, supports_sdpa
from lorakit.models.classifier import (classifier_attn_implementation, classifier_config, load_classifier, load_classifier_tokenizer,
                                       read_model_config, resolve_classifier_dir)
from lorakit.tasks import sentiment
from lorakit.train.classification import SEQ_CLS
from lorakit.train.config import SEQ_CLS_TARGETS, RunConfig
from lorakit.train.loop import train
from lorakit.train.outputs import check_output_dir, write_run_config, write_summary
from lorakit.train.step import evaluate_loss


@dataclass
class ClassData:
    train: list[ClassRecord]
    eval: list[ClassRecord]
    labels: LabelSet
    train_ids: list[int]
    eval_ids: list[int]
    shipped_task: bool


def prepare_class_data(config: RunConfig) -> ClassData:
    """Records and their labels, validated (no tokenizer, no model): bad data fails here.

    Raises:
        LorakitError: bad records under on_bad_record=error, labels the training data lacks, fewer than
            two classes, or a num_labels that disagrees with the data.
    """
    d = config.data
    shipped = not d.path
    if shipped:
        train_raw, eval_raw = sentiment.train_eval_records(d.task_train_examples, d.task_eval_examples)
        train = [parse_class_record(r, f"shipped task #{i}") for i, r in enumerate(train_raw)]
        held = [parse_class_record(r, f"shipped task eval #{i}") for i, r in enumerate(eval_raw)]
        known = train
    elif d.eval_path:
        train = load_class_records(d.path, d.on_bad_record).records
        held = load_class_records(d.eval_path, d.on_bad_record).records
        known = train
    else:
        everything = load_class_records(d.path, d.on_bad_record).records
        train, held = train_eval_split(everything, eval_fraction=d.eval_fraction, seed=config.train.seed)
        known = everything
    if not train:
        raise LorakitError(f"no training records left in {d.path} after holding out the eval split; lower eval_fraction or add data")
    labels = LabelSet.from_records(known, config.model.num_labels, _model_id2label(config))
    train_ids = labels.encode(train, d.path or "the shipped task")
    eval_ids = labels.encode(held, d.eval_path or d.path or "the shipped task")
    return ClassData(train, held, labels, train_ids, eval_ids, shipped)


def _model_id2label(config: RunConfig) -> dict[int, str] | None:
    """A model directory's own class names (used for integer labels), if it has meaningful ones."""
    names = read_model_config(resolve_classifier_dir(config.model.name)).get("id2label") or {}
    named = {int(k): v for k, v in names.items()}
    return named if named and any(v != f"LABEL_{k}" for k, v in named.items()) else None


@dataclass
class ClassRun:
    """What a classification run trains: the LoRA-wrapped classifier, its tokenizer and the tokenized data."""

    model: object
    tokenizer: object
    data: ClassData
    train_examples: list[ClassExample]
    eval_examples: list[ClassExample]

    @property
    def batcher(self) -> LengthGroupedBatches:
        return LengthGroupedBatches(self.tokenizer.pad_token_id)


def prepare_run(config: RunConfig, log=print) -> ClassRun:
    """Data, labels, tokenizer, classifier and a fresh adapter, as `config` says (nothing written)."""
    if config.quant.enabled:
        raise LorakitError("quantized bases (QLoRA) are not supported for SEQ_CLS yet; drop the quant settings")
    data = prepare_class_data(config)
    tokenizer = load_classifier_tokenizer(config.model.name)
    max_len = config.data.max_seq_len
    train_examples = tokenize_class(data.train, data.train_ids, tokenizer, max_len)
    eval_examples = tokenize_class(data.eval, data.eval_ids, tokenizer, max_len) if data.eval else []
    log(f"data: {len(train_examples)} train / {len(eval_examples)} eval examples, {data.labels.num_labels} labels "
        f"({', '.join(data.labels.names[:8])}); batches grouped by length, padded per batch")
    model = load_classifier(config.model.name, data.labels.num_labels, data.labels.id2label, config.model.dtype, tokenizer.pad_token_id,
                            attn_implementation=training_attention(config.model.name))
    torch.manual_seed(config.train.seed)
    peft_model = get_peft_model(model, _lora_for(model, config))
    if config.train.bf16:  # the head trains in full: fp32 master weights, bf16 compute under autocast
        for module in peft_model.modules():
            if isinstance(module, ModulesToSave):
                module.modules_to_save.float()
    return ClassRun(peft_model, tokenizer, data, train_examples, eval_examples)


def run_classification(config: RunConfig, log=print) -> dict:
    """Train a SEQ_CLS adapter as `config` says; returns a summary (also printed)."""
    out = check_output_dir(config)
    run = prepare_run(config, log)
    peft_model, tokenizer, data, train_examples, eval_examples = run.model, run.tokenizer, run.data, run.train_examples, run.eval_examples
    peft_model.print_trainable_parameters()

    write_run_config(out, config)
    result = train(peft_model, train_examples, eval_examples, config.train, log=log, objective=SEQ_CLS, batcher=run.batcher)
    summary: dict = {"steps": result.steps, "adapter": str(out / "adapter")}
    if result.interrupted:
        return summary
    write_labels(out / "adapter", data.labels)
    if eval_examples and config.train.compare_base:
        summary["before"], summary["after"] = score(peft_model, eval_examples, data, tokenizer.pad_token_id, config)
        log(before_after_table(summary["before"], summary["after"]))
    elif result.eval_loss is not None:
        summary["eval_loss"] = result.eval_loss
        log(f"eval loss {result.eval_loss:.4f}")
    return write_summary(out, summary, result, log)


FAMILY_TARGETS = {"distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"], "modernbert": ["Wqkv"]}
"""SEQ_CLS's default targets for families whose query / value projections have their own names
(DeBERTa-v2's are peft's default for it; peft has none for DistilBERT and ModernBERT, so their own
q_lin / v_lin and fused Wqkv: "all-linear" would also name their new heads' linears, which peft then
refuses to load)."""


def training_attention(name: str) -> str:
    """The attention a classifier trains with: SDPA with lorakit's attention dropout where the class calls
    attention through transformers' interface, else its own (eager for DeBERTa-v2, which has no SDPA)."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_classifier_dir(name)
    model_config = classifier_config(path)
    if supports_sdpa(model_config, AutoModelForSequenceClassification) and supports_attention_interface(model_config, AutoModelForSequenceClassification):
        return register_dropout_sdpa()
    return classifier_attn_implementation(path)


def _lora_for(model, config: RunConfig):
    """The lora section for this model: SEQ_CLS's default targets narrowed to the names the model has,
    and every module the checkpoint lacked trained in full and saved (else the adapter reloads onto
    other random weights: DistilBERT's pre_classifier, DeBERTa-v2's pooler)."""
    lora = config.lora
    saved = list(lora.modules_to_save or [])
    taken = saved + list(SEQ_CLS_HEAD_NAMES)
    missing = [p for p in getattr(model, "lorakit_new_modules", []) if not _inside_saved(taken, p)]
    if missing:
        lora = replace(lora, modules_to_save=saved + missing)
    if lora.target_modules == SEQ_CLS_TARGETS:
        names = [n for n, _ in model.named_modules()]
        candidates = FAMILY_TARGETS.get(getattr(model.config, "model_type", ""), SEQ_CLS_TARGETS)
        present = [t for t in candidates if any(name_matches([t], n) for n in names)]
        lora = replace(lora, target_modules=present or "all-linear")
    return lora


def _inside_saved(names: list[str], path: str) -> bool:
    """True when `path` or a module above it is one modules_to_save takes (RoBERTa's classifier.dense)."""
    parts = path.split(".")
    return any(module_to_save_matches(names, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def score(model, eval_examples: list[ClassExample], data: ClassData, pad_token_id: int, config: RunConfig) -> tuple[dict, dict]:
    """Accuracy, macro-F1 and eval loss on the held-out records: the base (its untrained head) and the adapter."""
    base, adapter = score_classifier(model, eval_examples, data.eval, data.labels, pad_token_id,
                                     {"base": BASE, "adapter": model.active_adapter}, config.train.per_device_eval_batch_size, config.train.bf16)
    batches = lambda: LengthGroupedBatches(pad_token_id)(eval_examples, config.train.per_device_eval_batch_size, shuffle=False)  # noqa: E731
    with model.disable_adapter():
        base_loss = evaluate_loss(model, batches(), config.train.bf16, SEQ_CLS)
    adapter_loss = evaluate_loss(model, batches(), config.train.bf16, SEQ_CLS)
    return ({"accuracy": base.accuracy, "macro_f1": base.macro_f1, "eval_loss": base_loss},
            {"accuracy": adapter.accuracy, "macro_f1": adapter.macro_f1, "eval_loss": adapter_loss})


def before_after_table(before: dict, after: dict) -> str:
    rows = [("", "untrained head", "with adapter"),
            ("accuracy", f"{before['accuracy']:.1%}", f"{after['accuracy']:.1%}"),
            ("macro-F1", f"{before['macro_f1']:.3f}", f"{after['macro_f1']:.3f}"),
            ("eval loss", f"{before['eval_loss']:.4f}", f"{after['eval_loss']:.4f}")]
    return "\n".join(f"  {a:<12} {b:>14} {c:>14}" for a, b, c in rows)
