"""`LoraConfig` with peft's field names and meaning, and its validation."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ConfigError

BIAS_MODES = ("none", "all", "lora_only")
UNSUPPORTED_PEFT_KEYS = (
    "lora_bias", "layers_to_transform", "layer_replication", "trainable_token_indices",
)
INIT_METHODS = ("gaussian", "pissa", "pissa_niter_N", "olora", "loftq", "eva")
"""peft's init_lora_weights strings lorakit runs (besides True and False); lora/init.py does each ("eva" then
needs a data pass: lora/eva.py). Not yet: "corda", "lora_ga", "orthogonal", "mica"."""
EVA_DEFAULTS: dict[str, Any] = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                                "whiten": False, "adjust_scaling_factors": True}
"""peft's EvaConfig fields and defaults (eva_config's keys)."""


class TaskType(str, enum.Enum):
    """peft's task types; only the name is stored, the wrapped model decides the head."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def setting(default: Any, help: str, *, cli: bool = True) -> Any:
    """A dataclass field documented once: `help` is what `lorakit train --help` prints for it. `cli=False`
    keeps a field out of the training settings (recorded in files, not chosen by users)."""
    metadata = {"help": help, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def settings(cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that users set (documented with `setting(..., cli=True)`)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


@dataclass
class LoraConfig:
    """What to adapt and how; field names and defaults follow peft's `LoraConfig`."""

    r: int = setting(8, "LoRA rank: the update B A has this inner dimension")
    lora_alpha: float = setting(8, "scale numerator: updates are multiplied by lora_alpha / r (or / sqrt(r) with use_rslora)")
    target_modules: list[str] | str | None = setting(
        None, "layer names or dotted suffixes (a list), a regex full-matched against the module path (a string), "
        "or 'all-linear' (every linear layer except the output head)")
    exclude_modules: list[str] | str | None = setting(None, "modules never adapted, matched like target_modules")
    target_parameters: list[str] | None = setting(
        None, "parameters adapted directly, as 'module.param' paths or dotted suffixes: fused 3-D MoE experts such as "
        "'experts.gate_up_proj', 'experts.down_proj' (one rank-r pair per expert; needs lora_dropout 0)")
    lora_dropout: float = setting(0.0, "dropout on the LoRA path's input only")
    bias: str = setting("none", "none | all | lora_only: which biases train (lora_only: those of adapted layers)")
    modules_to_save: list[str] | None = setting(None, "modules trained in full and saved with the adapter (e.g. a classifier head)")
    use_rslora: bool = setting(False, "scale by lora_alpha / sqrt(r) instead of lora_alpha / r")
    fan_in_fan_out: bool = setting(False, "True for GPT-2's Conv1D, which stores its weight as (in, out); set from the layers", cli=False)
    task_type: TaskType | str | None = setting(None, "what the model is trained for (peft's task types)")
    base_model_name_or_path: str | None = setting(None, "the base model the adapter was trained on", cli=False)
    inference_mode: bool = setting(False, "frozen adapter (written True in adapter_config.json)", cli=False)
    use_dora: bool = setting(False, "DoRA: a trained magnitude per output row times the direction of W + scaling * B A")
    init_lora_weights: bool | str = setting(
        True, "true (A Kaiming, B zero) | false (both random: not a no-op) | gaussian | pissa | pissa_niter_N | olora "
        "(pissa / olora move the top of W into the adapter and leave the residual in the base) | loftq (needs "
        "loftq_config) | eva (A from the train data's activations: eva_config)")
    rank_pattern: dict[str, int] = setting({}, "per-layer ranks: {regex: r}, a key matching the end of a module path (peft's rule)")
    alpha_pattern: dict[str, float] = setting({}, "per-layer lora_alpha: {regex: alpha}, matched like rank_pattern")
    loftq_config: dict[str, int] = setting({}, "for init_lora_weights loftq: {loftq_bits: 4, loftq_iter: 1}")
    eva_config: dict[str, Any] | None = setting(
        None, "for init_lora_weights eva (A from the SVD of each layer's inputs on the first train batches, ranks "
        "redistributed): {rho: 2.0, tau: 0.99, use_label_mask: true, label_mask_value: -100, whiten: false, "
        "adjust_scaling_factors: true} (peft's EvaConfig; unset keys take these defaults)")

    def __post_init__(self) -> None:
        # peft accepts sets (and stores them as lists); so does lorakit.
        for name in ("target_modules", "exclude_modules", "modules_to_save", "target_parameters"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        if isinstance(self.target_parameters, str):  # `--target_parameters experts.down_proj`: one name
            self.target_parameters = [self.target_parameters]
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        self.validate()

    def problems(self) -> list[str]:
        """Every problem with the values, so the user can fix them all at once."""
        found = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            found.append(f"r must be a positive integer (got {self.r!r}); try r=8 or r=16")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            found.append(f"lora_alpha must be > 0 (got {self.lora_alpha!r}); a common choice is 2 * r")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            found.append(f"lora_dropout must be in [0, 1) (got {self.lora_dropout!r})")
        if self.bias not in BIAS_MODES:
            found.append(f"bias must be one of {', '.join(BIAS_MODES)} (got {self.bias!r})")
        if self.task_type is not None and self.task_type not in TaskType._value2member_map_:
            found.append(f"task_type {self.task_type!r} is unknown; use one of {', '.join(TaskType._value2member_map_)}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                found.append(f"{name} must be a list of module names or a regex string (got {value!r})")
        found += self._parameter_problems()
        found += self._method_problems()
        return found

    def _parameter_problems(self) -> list[str]:
        """target_parameters: names, and no dropout (x cannot be factored out of a parameter; peft refuses it too)."""
        value = self.target_parameters
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            return [f"target_parameters must be a list of parameter names like ['experts.gate_up_proj'] (got {value!r})"]
        if self.lora_dropout:
            return [f"lora_dropout must be 0 with target_parameters (got {self.lora_dropout!r}); set lora_dropout 0"]
        return []

    def _method_problems(self) -> list[str]:
        """The DoRA / init / pattern settings (split from problems() to keep each short)."""
        found = []
        init = self.init_lora_weights
        loftq = self.loftq_config if isinstance(self.loftq_config, dict) else {}
        if not isinstance(self.loftq_config, dict):
            found.append(f"loftq_config must be a mapping like {{loftq_bits: 4, loftq_iter: 1}} (got {self.loftq_config!r})")
        if not isinstance(init, bool) and init_method(init) is None:
            found.append(f"init_lora_weights {init!r} is not supported; use true, false or one of {', '.join(INIT_METHODS)}")
        if init == "loftq" and loftq.get("loftq_bits", 4) not in (4, 8):
            found.append(f"loftq_config loftq_bits must be 4 or 8 (got {loftq.get('loftq_bits')!r})")
        if init == "loftq" and not (isinstance(iters := loftq.get("loftq_iter", 1), int) and iters >= 1):
            found.append(f"loftq_config loftq_iter must be a whole number >= 1 (got {iters!r})")
        found += eva_problems(self.eva_config)
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) and v > 0 for k, v in value.items()
            ):
                found.append(f"{name} must map module-name regexes to positive {'integers' if kind is int else 'numbers'} (got {value!r})")
        return found

    def layer_rank_alpha(self, path: str) -> tuple[int, float]:
        """(r, lora_alpha) of the layer at `path` (its path in the transformers model): the first
        rank_pattern / alpha_pattern key matching the end of the path at a dot boundary, as peft's
        get_pattern_key does (re.match(rf"(.*\.)?({key})$", path)), else r / lora_alpha."""
        r = next((v for k, v in self.rank_pattern.items() if re.match(rf"(.*\.)?({k})$", path)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", path)), self.lora_alpha)
        return r, alpha

    def layer_scaling(self, path: str) -> float:
        """lora_alpha / r (or / sqrt(r) with rsLoRA) of the layer at `path`."""
        r, alpha = self.layer_rank_alpha(path)
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    @property
    def max_rank(self) -> int:
        """The largest rank any layer gets (r or a rank_pattern value): what a bank of adapters must hold."""
        return max([self.r, *self.rank_pattern.values()]) if isinstance(self.rank_pattern, dict) else self.r

    def validate(self) -> None:
        found = self.problems()
        if found:
            raise ConfigError(found, "LoraConfig")

    def to_peft_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content, with the keys peft and vLLM read."""
        targets = self.target_modules
        if isinstance(targets, list):
            targets = sorted(set(targets))
        return {
            "alpha_pattern": dict(self.alpha_pattern),
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias,
            "exclude_modules": self.exclude_modules,
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": self.init_lora_weights,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": self.lora_alpha,
            "lora_bias": False,
            "lora_dropout": self.lora_dropout,
            "loftq_config": dict(self.loftq_config),
            "eva_config": eva_settings(self) if self.init_lora_weights == "eva" else self.eva_config,
            "modules_to_save": self.modules_to_save,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": dict(self.rank_pattern),
            "revision": None,
            "target_modules": targets,
            "target_parameters": sorted(set(self.target_parameters)) if self.target_parameters else None,
            "task_type": self.task_type,
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read an `adapter_config.json`, ignoring keys lorakit does not use (newer peft versions add some)."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ConfigError([f"peft_type {data['peft_type']!r} is not supported; lorakit reads LoRA adapters only"], "adapter config")
        # Each of these changes what the weights mean; ignoring one would load an adapter that computes the wrong thing.
        unsupported = [k for k in UNSUPPORTED_PEFT_KEYS if data.get(k)]
        if unsupported:
            raise ConfigError([f"adapter uses {', '.join(unsupported)}, which lorakit does not support"], "adapter config")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["inference_mode"] = False
        if isinstance(kwargs.get("eva_config"), dict):  # only used at init: a newer peft's extra keys are dropped
            kwargs["eva_config"] = {k: v for k, v in kwargs["eva_config"].items() if k in EVA_DEFAULTS}
        return cls(**kwargs)


def init_method(value: bool | str) -> str | None:
    """The init_lora_weights value as INIT_METHODS names it ("pissa_niter_4" -> "pissa_niter_N"), None if unknown."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str):
        return None
    if value.startswith("pissa_niter_"):
        return "pissa_niter_N" if value.removeprefix("pissa_niter_").isdigit() else None
    return value if value in INIT_METHODS else None


def eva_problems(eva_config: Any) -> list[str]:
    """What is wrong with an eva_config (peft's EvaConfig checks, and unknown keys)."""
    if eva_config is None:
        return []
    if not isinstance(eva_config, dict):
        return [f"eva_config must be a mapping like {{rho: 2.0, tau: 0.99}} (got {eva_config!r})"]
    found = [f"eva_config has no setting {k!r}; use {', '.join(EVA_DEFAULTS)}" for k in eva_config if k not in EVA_DEFAULTS]
    values = {**EVA_DEFAULTS, **eva_config}
    rho, tau = values["rho"], values["tau"]
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 1:
        found.append(f"eva_config rho must be a number >= 1 (got {rho!r}); 1 keeps every layer at r, 2 lets one reach 2r")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1:
        found.append(f"eva_config tau must be in [0, 1] (got {tau!r}); peft's default is 0.99")
    for key in ("use_label_mask", "whiten", "adjust_scaling_factors"):
        if not isinstance(values[key], bool):
            found.append(f"eva_config {key} must be true or false (got {values[key]!r})")
    if isinstance(values["label_mask_value"], bool) or not isinstance(values["label_mask_value"], int):
        found.append(f"eva_config label_mask_value must be an integer (got {values['label_mask_value']!r}); -100 is the ignored label")
    return found


def eva_settings(config: LoraConfig) -> dict[str, Any]:
    """The adapter's eva_config with peft's defaults filled in (what peft's EvaConfig holds)."""
    return {**EVA_DEFAULTS, **(config.eva_config or {})}


def replace(config: LoraConfig, **changes: Any) -> LoraConfig:
    return dataclasses.replace(config, **changes)


__all__ = ["LoraConfig", "TaskType", "BIAS_MODES", "INIT_METHODS", "EVA_DEFAULTS", "eva_settings", "init_method", "replace", "setting", "settings"]
