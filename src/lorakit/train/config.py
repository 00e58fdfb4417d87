"""The `lorakit train` configuration: model, quant, lora, data and train sections, from YAML and CLI overrides.

The `lora` section is the library's own `LoraConfig` (with training defaults: r=16, alpha 32, the four
attention projections) and the `quant` section its `QuantConfig`, so a setting exists once and
is documented once, in its field's `help` (`lorakit.config.setting`), which `lorakit train --help`
prints. Field names are peft's and transformers' (`r`, `lora_alpha`, `per_device_train_batch_size`, ...).
`load_run_config` gathers every problem (unknown keys, wrong types, bad values, a missing data file) and
reports them all at once, before any model is loaded."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from lorakit.config import LoraConfig, TaskType, setting, settings
from lorakit.data.formats import FORMATS
from lorakit.data.records import BAD_RECORD_POLICIES
from lorakit.dtypes import DTYPES
from lorakit.errors import ConfigError
from lorakit.quant.config import QuantConfig
from lorakit.train.optim import optimizer_problems
from lorakit.train.tensorboard import report_to_problems

TASK_TYPES = (TaskType.CAUSAL_LM.value, TaskType.SEQ_CLS.value)
"""Task types `lorakit train` can train: causal LM (generation) and sequence classification."""

SEQ_CLS_TARGETS = ["query", "value", "q_proj", "v_proj"]
"""peft's default LoRA targets for classifiers (BERT family: query, value; Llama family: q_proj, v_proj);
the run keeps the names its model has."""
SEQ_CLS_DEFAULTS: dict[tuple[str, str], Any] = {
    ("lora", "r"): 8, ("lora", "lora_alpha"): 16, ("lora", "target_modules"): SEQ_CLS_TARGETS,
    ("data", "max_seq_len"): 128, ("data", "task_train_examples"): 800, ("data", "task_eval_examples"): 200,
    ("data", "eval_fraction"): 0.1,
    ("train", "learning_rate"): 1e-3, ("train", "per_device_train_batch_size"): 16, ("train", "per_device_eval_batch_size"): 64,
    ("train", "num_train_epochs"): 3.0, ("train", "warmup_ratio"): 0.1,
}
"""Defaults that differ for task_type SEQ_CLS (peft's recipe for a small encoder: r=8 on query/value, the head
trained in full at lr 1e-3, batches of 16); a value the user sets wins."""


@dataclass
class ModelSection:
    name: str = setting("default", "'default' (SmolLM2-135M-Instruct) or a local transformers model directory")
    dtype: str = setting("bfloat16", "dtype of the frozen base weights: bfloat16 (fast on AMX CPUs) or float32")
    num_labels: int = setting(0, "SEQ_CLS only: number of classes (0: from the data; must agree with it when set)")


def training_lora() -> LoraConfig:
    """The `lora` section's defaults: peft's LoraConfig with the values lorakit trains with."""
    return LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")


@dataclass
class DataSection:
    path: str = setting("", "training data: .jsonl, .json, .csv, .parquet or a datasets.save_to_disk directory (empty: the shipped task: order->JSON, or sentiment reviews for SEQ_CLS)")
    eval_path: str = setting("", "held-out data file; empty: split eval_fraction off the training data")
    format: str = setting("auto", "auto | alpaca | dolly | chat | sharegpt | text")
    template: str = setting("auto", "prompt template: auto (the tokenizer's chat template if it has one) | alpaca | chatml")
    max_seq_len: int = setting(512, "tokens per packed row; longer examples are truncated")
    packing: bool = setting(True, "pack examples into full rows (no compute on padding)")
    eval_fraction: float = setting(0.05, "share of the data held out for eval loss when eval_path is empty")
    train_on_inputs: bool = setting(False, "also learn the prompt tokens (default: loss on responses only)")
    on_bad_record: str = setting("skip", "skip | error: what to do with records that miss fields or have empty responses")
    task_train_examples: int = setting(1000, "shipped task only (path empty): training examples to generate")
    task_eval_examples: int = setting(50, "shipped task only: held-out examples scored by exact match")


@dataclass
class TrainSection:
    output_dir: str = setting("out/lorakit", "where the adapter, checkpoints, metrics.jsonl and loss.png go")
    per_device_train_batch_size: int = setting(4, "rows per micro-batch")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    global_batch_size: int = setting(0, "rows per optimizer step over all processes; > 0 sets gradient_accumulation_steps to "
                                     "it / (per_device_train_batch_size x processes), which must divide it (0: not used)")
    fsdp: bool = setting(False, "torchrun only: shard the frozen base over the processes (FSDP2 fully_shard per decoder "
                         "layer; the adapter stays replicated)")
    num_train_epochs: float = setting(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = setting(-1, "optimizer steps to run; > 0 overrides num_train_epochs")
    learning_rate: float = setting(2e-4, "peak learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_ratio: float = setting(0.03, "share of the steps spent warming the learning rate up linearly")
    warmup_steps: int = setting(0, "warm-up steps; > 0 overrides warmup_ratio")
    lr_scheduler_type: str = setting("cosine", "cosine | linear | constant (after warm-up)")
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this; 0 disables clipping")
    optim: str = setting("adamw_torch", "adamw_torch | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit")
    loraplus_lr_ratio: float = setting(0.0, "LoRA+: the B matrices (and DoRA magnitudes, biases) learn at learning_rate x this "
                                       "(peft's create_loraplus_optimizer; the paper uses 16); 0: off")
    bf16: bool = setting(True, "bf16 autocast for the forward and backward passes")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, ~30% slower")
    logging_steps: int = setting(10, "log every N optimizer steps")
    eval_steps: int = setting(0, "evaluate every N steps; the eval loss goes to metrics.jsonl and loss.png (0: only at the end)")
    save_steps: int = setting(0, "checkpoint every N steps (0: only on Ctrl-C)")
    save_total_limit: int = setting(0, "keep only the newest N checkpoints, never the one resumed from (0: keep all)")
    per_device_eval_batch_size: int = setting(4, "rows per eval batch")
    seed: int = setting(42, "seed for the adapter init, data order and dropout")
    resume_from_checkpoint: str = setting("", "a checkpoint directory, or 'latest' for the newest in output_dir")
    report_to: str = setting("none", "none | tensorboard: also write metrics.jsonl's scalars as TensorBoard events in "
                             "output_dir/runs (needs pip install tensorboard)")
    compare_base: bool = setting(True, "for the shipped task: score the base model and the adapter on held-out examples")
    finetune: str = setting("lora", "lora | full: train an adapter, or every weight of the base as a baseline (fp32 master "
                            "weights; writes a transformers model directory in output_dir/model; `lorakit train --full`)")
    compare_with: str = setting("", "a finished run's output_dir: print this run's memory, time and quality beside its summary.json")


SECTIONS: dict[str, type] = {"model": ModelSection, "quant": QuantConfig, "lora": LoraConfig, "data": DataSection, "train": TrainSection}
FOLDED = {("model", "quant")}
"""(written under, belongs to): README configs put the quantization settings under `model:`."""


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=training_lora)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by section (what `load_run_config` reads back)."""
        return {name: {f.name: _plain(getattr(getattr(self, name), f.name)) for f in settings(cls)} for name, cls in SECTIONS.items()}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def field_owner() -> dict[str, str]:
    """Flat setting name -> its section (names are unique across sections)."""
    return {f.name: section for section, cls in SECTIONS.items() for f in settings(cls)}


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """YAML / CLI text to the field's type (`int`, `bool | None`, `list[str] | str | None`, ...), or ValueError naming the field."""
    kinds = set(get_args(kind)) if get_origin(kind) in (Union, types.UnionType) else {kind}
    if value is None and type(None) in kinds:
        return None
    if bool in kinds:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if str in kinds and isinstance(value, str):  # init_lora_weights: true | false | pissa | ...
            return value
        raise ValueError(f"{name} must be true or false (got {value!r})")
    if kinds & {int, float}:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number (got {value!r})")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number (got {value!r})") from None
        if int in kinds:
            if number != int(number):
                raise ValueError(f"{name} must be a whole number (got {value!r})")
            return int(number)
        return number
    if kinds == {str}:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name} must be a string (got {value!r})")
        return "" if value is None else str(value)
    if any(get_origin(k) is dict for k in kinds) and isinstance(value, str):  # --rank_pattern '{"q_proj": 4}'
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(f"{name} must be a mapping, as YAML or JSON (got {value!r}), e.g. '{{\"q_proj\": 4}}'") from None
    takes_list = any(get_origin(k) is list for k in kinds)
    if takes_list and isinstance(value, str) and "," in value:  # --target_modules q_proj,v_proj
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _assign(values: dict[str, dict[str, Any]], key: str, value: Any, problems: list[str]) -> None:
    owners = field_owner()
    section, _, name = key.rpartition(".")
    owner = owners.get(name, "")
    if not section or (section, owner) in FOLDED:
        section = owner
    if section not in SECTIONS or owner != section:
        close = difflib.get_close_matches(name, list(owners), n=1)
        problems.append(f"unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "; see lorakit train --help"))
        return
    values.setdefault(section, {})[name] = value


def load_run_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read YAML (sections or flat keys), apply overrides, validate everything; raise ConfigError listing all problems."""
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {}
    for key, value in _read_yaml(path, problems).items():
        if key in SECTIONS and isinstance(value, dict):
            for name, inner in value.items():
                _assign(values, f"{key}.{name}", inner, problems)
        else:
            _assign(values, key, value, problems)
    for key, value in (overrides or {}).items():
        _assign(values, key.replace("-", "_"), value, problems)
    if values.get("lora", {}).get("task_type") == TaskType.SEQ_CLS.value:
        for (section, name), value in SEQ_CLS_DEFAULTS.items():
            values.setdefault(section, {}).setdefault(name, value)
    defaults = RunConfig()
    sections = {}
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        kwargs = {}
        for name, value in values.get(section, {}).items():
            try:
                kwargs[name] = _coerce(value, hints[name], name)
            except ValueError as err:
                problems.append(str(err))
        try:  # LoraConfig and QuantConfig validate themselves; keep their defaults to check the rest
            sections[section] = dataclasses.replace(getattr(defaults, section), **kwargs)
        except ConfigError as err:
            problems += err.problems
            sections[section] = getattr(defaults, section)
    config = RunConfig(**sections)
    problems += validate(config)
    if problems:
        raise ConfigError(problems, "training config")
    return config


def _read_yaml(path: str | os.PathLike | None, problems: list[str]) -> dict[str, Any]:
    if not path:
        return {}
    path = Path(path)
    if not path.is_file():
        problems.append(f"config file {str(path)!r} does not exist")
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        problems.append(f"{path} is not valid YAML ({str(err).splitlines()[0]})")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path} must hold a mapping of settings, not a {type(data).__name__}")
        return {}
    return data


def validate(config: RunConfig) -> list[str]:
    """Every problem with the values the sections do not check themselves (LoraConfig and QuantConfig
    do): task, data and training settings together."""
    found: list[str] = []
    if config.lora.task_type not in TASK_TYPES:
        found.append(f"task_type {config.lora.task_type!r} is not supported by lorakit train yet; use {' or '.join(TASK_TYPES)}")
    d, t = config.data, config.train
    if config.model.num_labels < 0 or config.model.num_labels == 1:
        found.append(f"num_labels must be 0 (from the data) or >= 2 (got {config.model.num_labels})")
    if d.path and not Path(d.path).exists():
        found.append(f"data path {d.path!r} does not exist")
    if d.eval_path and not Path(d.eval_path).exists():
        found.append(f"eval_path {d.eval_path!r} does not exist")
    if d.format not in ("auto", *FORMATS):
        found.append(f"format must be auto or one of {', '.join(FORMATS)} (got {d.format!r})")
    if d.on_bad_record not in BAD_RECORD_POLICIES:
        found.append(f"on_bad_record must be one of {', '.join(BAD_RECORD_POLICIES)} (got {d.on_bad_record!r})")
    if d.task_train_examples < 1 or d.task_eval_examples < 1:
        found.append("task_train_examples and task_eval_examples must be >= 1")
    if d.max_seq_len < 16:
        found.append(f"max_seq_len must be >= 16 (got {d.max_seq_len})")
    if not 0 <= d.eval_fraction < 1:
        found.append(f"eval_fraction must be in [0, 1) (got {d.eval_fraction})")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size"):
        if getattr(t, name) < 1:
            found.append(f"{name} must be >= 1 (got {getattr(t, name)})")
    for name in ("logging_steps", "eval_steps", "save_steps", "save_total_limit", "warmup_steps", "global_batch_size"):
        if getattr(t, name) < 0:
            found.append(f"{name} must be >= 0 (got {getattr(t, name)})")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        found.append("set num_train_epochs > 0 or max_steps > 0")
    if t.learning_rate <= 0:
        found.append(f"learning_rate must be > 0 (got {t.learning_rate})")
    if not 0 <= t.warmup_ratio < 1:
        found.append(f"warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
    if t.lr_scheduler_type not in ("cosine", "linear", "constant"):
        found.append(f"lr_scheduler_type must be cosine, linear or constant (got {t.lr_scheduler_type!r})")
    if config.lora.init_lora_weights == "eva" and config.lora.task_type == TaskType.SEQ_CLS.value:
        found.append("init_lora_weights eva's data pass runs in causal LM training only; use true or pissa for SEQ_CLS")
    if t.loraplus_lr_ratio < 0:
        found.append(f"loraplus_lr_ratio must be >= 0 (got {t.loraplus_lr_ratio}); 0 turns LoRA+ off, the paper uses 16")
    if t.max_grad_norm < 0:
        found.append(f"max_grad_norm must be >= 0 (got {t.max_grad_norm})")
    if config.model.dtype not in DTYPES:
        found.append(f"model dtype must be one of {', '.join(DTYPES)} (got {config.model.dtype!r})")
    found += optimizer_problems(t.optim)
    if t.compare_with and not (Path(t.compare_with) / "summary.json").is_file():
        found.append(f"compare_with {t.compare_with!r} has no summary.json; point it at a finished run's output_dir")
    from lorakit.train.full import full_problems  # here: train/full.py runs training, which imports this module

    found += full_problems(config, RunConfig().lora)
    found += report_to_problems(t.report_to)
    return found


def help_text() -> str:
    """Every setting with its default and meaning, grouped by section (for `lorakit train --help`)."""
    defaults = RunConfig()
    lines = ["settings (YAML sections or flat keys; override any with --name value):"]
    for section, cls in SECTIONS.items():
        lines.append(f"\n  {section}:")
        for f in settings(cls):
            lines.append(f"    {f.name:<30} {f.metadata['help']} (default: {getattr(getattr(defaults, section), f.name)!r})")
    return "\n".join(lines)
