"""lorakit: LoRA and QLoRA fine-tuning with peft-compatible adapters.

The public names mirror peft's (`LoraConfig`, `get_peft_model`, `PeftModel`) so peft code runs
with only its imports changed."""

import os

# The hub is unreachable here: make transformers fail fast instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lorakit.config import LoraConfig, TaskType  # noqa: E402
from lorakit.errors import ConfigError, LorakitError  # noqa: E402
from lorakit.lora.model import LoraModel, PeftModel, PeftModelForCausalLM, get_peft_model  # noqa: E402
from lorakit.models.load import load_model, load_tokenizer  # noqa: E402
from lorakit.quant.config import QuantConfig  # noqa: E402
from lorakit.quant.prepare import prepare_model_for_kbit_training  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "TaskType",
    "LoraModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "get_peft_model",
    "load_model",
    "load_tokenizer",
    "QuantConfig",
    "prepare_model_for_kbit_training",
    "LorakitError",
    "ConfigError",
]
