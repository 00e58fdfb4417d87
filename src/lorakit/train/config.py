"""The `lorakit train` configuration: model, lora, data and train sections, from YAML and CLI overrides.

Field names are peft's and transformers' (`r`, `lora_alpha`, `per_device_train_batch_size`, ...), each
with its help text, which `lorakit train --help` prints. `load_run_config` gathers every problem
(unknown keys, wrong types, bad values, a missing data file) and reports them all at once, before
any model is loaded."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.quant.config import QuantConfig


def opt(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSection:
    name: str = opt("default", "'default' (SmolLM2-135M-Instruct) or a local transformers model directory")
    dtype: str = opt("bfloat16", "dtype of the frozen base weights: bfloat16 (fast on AMX CPUs) or float32")
    quantization: str = opt("none", "nf4 | fp4 | int8 | none: store the frozen base quantized (QLoRA)")
    double_quant: bool = opt(True, "quantize the 4-bit block scales again (nf4 / fp4 only)")
    compute_dtype: str = opt("bfloat16", "dtype quantized weights are dequantized to for each matmul")


@dataclass
class LoraSection:
    r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32, "scale numerator: updates are multiplied by lora_alpha / r")
    target_modules: Any = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "layer names / suffixes, a regex string, or 'all-linear'")
    lora_dropout: float = opt(0.0, "dropout on the LoRA path's input")
    bias: str = opt("none", "none | all | lora_only: which biases train")
    use_rslora: bool = opt(False, "scale by lora_alpha / sqrt(r)")
    modules_to_save: Any = opt(None, "modules trained in full and saved with the adapter")


@dataclass
class DataSection:
    path: str = opt("", "training data: .jsonl, .json, .csv, .parquet or a datasets.save_to_disk directory (empty: the shipped order->JSON task)")
    eval_path: str = opt("", "held-out data file; empty: split eval_fraction off the training data")
    format: str = opt("auto", "auto | alpaca | dolly | chat | sharegpt | text")
    template: str = opt("auto", "prompt template: auto (the tokenizer's chat template if it has one) | alpaca | chatml")
    max_seq_len: int = opt(512, "tokens per packed row; longer examples are truncated")
    packing: bool = opt(True, "pack examples into full rows (no compute on padding)")
    eval_fraction: float = opt(0.05, "share of the data held out for eval loss when eval_path is empty")
    train_on_inputs: bool = opt(False, "also learn the prompt tokens (default: loss on responses only)")
    on_bad_record: str = opt("skip", "skip | error: what to do with records that miss fields or have empty responses")
    task_train_examples: int = opt(1000, "shipped task only (path empty): training examples to generate")
    task_eval_examples: int = opt(50, "shipped task only: held-out examples scored by exact match")


@dataclass
class TrainSection:
    output_dir: str = opt("out/lorakit", "where the adapter, checkpoints, metrics.jsonl and loss.png go")
    per_device_train_batch_size: int = opt(4, "rows per micro-batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    num_train_epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = opt(-1, "optimizer steps to run; > 0 overrides num_train_epochs")
    learning_rate: float = opt(2e-4, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_ratio: float = opt(0.03, "share of the steps spent warming the learning rate up linearly")
    warmup_steps: int = opt(0, "warm-up steps; > 0 overrides warmup_ratio")
    lr_scheduler_type: str = opt("cosine", "cosine | linear | constant (after warm-up)")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this; 0 disables clipping")
    optim: str = opt("adamw_torch", "adamw_torch | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit")
    bf16: bool = opt(True, "bf16 autocast for the forward and backward passes")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: less memory, ~30% slower")
    logging_steps: int = opt(10, "log every N optimizer steps")
    eval_steps: int = opt(0, "evaluate every N steps (0: only at the end)")
    save_steps: int = opt(0, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    per_device_eval_batch_size: int = opt(4, "rows per eval batch")
    seed: int = opt(42, "seed for the adapter init, data order and dropout")
    resume_from_checkpoint: str = opt("", "a checkpoint directory, or 'latest' for the newest in output_dir")
    compare_base: bool = opt(True, "for the shipped task: score the base model and the adapter on held-out examples")


SECTIONS = {"model": ModelSection, "lora": LoraSection, "data": DataSection, "train": TrainSection}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def lora_config(self) -> LoraConfig:
        return LoraConfig(task_type="CAUSAL_LM", **dataclasses.asdict(self.lora))

    def quant_config(self) -> QuantConfig:
        m = self.model
        return QuantConfig(quantization=m.quantization, double_quant=m.double_quant if m.quantization in ("nf4", "fp4") else None, compute_dtype=m.compute_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_owner() -> dict[str, str]:
    """Flat field name -> its section (names are unique across sections)."""
    return {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """YAML / CLI text to the field's type, or ValueError naming the field."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{name} must be true or false (got {value!r})")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number (got {value!r})")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number (got {value!r})") from None
        if kind is int:
            if number != int(number):
                raise ValueError(f"{name} must be a whole number (got {value!r})")
            return int(number)
        return number
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name} must be a string (got {value!r})")
        return "" if value is None else str(value)
    if isinstance(value, str) and "," in value and name in ("target_modules", "modules_to_save"):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _assign(values: dict[str, dict[str, Any]], key: str, value: Any, problems: list[str]) -> None:
    owners = field_owner()
    section, _, name = key.rpartition(".")
    if not section:
        section = owners.get(name, "")
    if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
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
    sections = {}
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        kwargs = {}
        for name, value in values.get(section, {}).items():
            try:
                kwargs[name] = _coerce(value, hints[name], name)
            except ValueError as err:
                problems.append(str(err))
        sections[section] = cls(**kwargs)
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
    """Every problem with the values: LoRA, quantization, data and training settings together."""
    from lorakit.data.records import BAD_RECORD_POLICIES
    from lorakit.data.formats import FORMATS
    from lorakit.train.optim import optimizer_problems

    found: list[str] = []
    try:
        LoraConfig(task_type="CAUSAL_LM", **dataclasses.asdict(config.lora))
    except ConfigError as err:
        found += err.problems
    try:
        config.quant_config()
    except ConfigError as err:
        found += err.problems
    d, t = config.data, config.train
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
    for name in ("logging_steps", "eval_steps", "save_steps", "warmup_steps"):
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
    if t.max_grad_norm < 0:
        found.append(f"max_grad_norm must be >= 0 (got {t.max_grad_norm})")
    if config.model.dtype not in ("bfloat16", "bf16", "float32", "fp32", "float16", "fp16"):
        found.append(f"model dtype must be bfloat16 or float32 (got {config.model.dtype!r})")
    found += optimizer_problems(t.optim)
    return found


def help_text() -> str:
    """Every setting with its default and meaning, grouped by section (for `lorakit train --help`)."""
    lines = ["settings (YAML sections or flat keys; override any with --name value):"]
    for section, cls in SECTIONS.items():
        lines.append(f"\n  {section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"    {f.name:<30} {f.metadata['help']} (default: {default!r})")
    return "\n".join(lines)
