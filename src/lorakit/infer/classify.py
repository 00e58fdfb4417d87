"""Classification inference: probabilities, accuracy and macro-F1 of base heads and SEQ_CLS adapters.

    model, tokenizer, labels = load_classification_adapters({"sentiment": "out/lorakit/adapter"})
    probs = predict_proba(model, tokenize_class(records, None, tokenizer, 512), tokenizer.pad_token_id)  # (N, C)
    # tokenize_class: lorakit.data.class_batches; records (ClassRecord): lorakit.data.classify

Batches are sorted by length (little padding), run without gradients under bf16 autocast, and the
rows come back in the input order. A SEQ_CLS adapter directory holds peft's two files plus
`labels.json` (the class names, which peft's files do not keep); an adapter trained by peft has
none, and its classes are named LABEL_0, LABEL_1, ... after the size of its saved head.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lorakit.data.class_batches import ClassExample, collate_class, length_grouped_indices, model_inputs
from lorakit.data.classify import ClassRecord, LabelSet
from lorakit.device import autocast, model_device
from lorakit.errors import LorakitError
from lorakit.io import atomic_write_text
from lorakit.lora.model import SEQ_CLS_HEAD_NAMES, LoraModel
from lorakit.lora.peft_format import PREFIX, read_adapter_config, read_adapter_weights
from lorakit.lora.routing import BASE

LABELS_FILE = "labels.json"

# Examples per inference batch. On this CPU 64 gave at most ~5% more examples/s than 16 (1,150-1,250
# a second on the default encoder either way) and raised a training run's peak memory by 11 MB.
SCORING_BATCH = 16


@dataclass
class ClassScore:
    label: str  # which model: "base" or an adapter name
    accuracy: float
    macro_f1: float
    predictions: list[dict] = field(default_factory=list)


@torch.no_grad()
def predict_proba(model, examples: Sequence[ClassExample], pad_token_id: int, batch_size: int = SCORING_BATCH, bf16: bool = True) -> torch.Tensor:
    """Class probabilities (N, C), fp32, rows in the order of `examples`."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out: list[tuple[list[int], torch.Tensor]] = []
    try:
        for group in length_grouped_indices([len(e) for e in examples], batch_size, shuffle=False):
            batch = collate_class([examples[i] for i in group], pad_token_id)
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            with autocast(device, bf16):
                logits = model(**inputs).logits
            out.append((group, logits.float().softmax(-1).cpu()))
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0, 0)
    probs = torch.empty(len(examples), out[0][1].shape[-1])
    for group, p in out:
        probs[group] = p
    return probs


def accuracy_and_macro_f1(predicted: Sequence[int], gold: Sequence[int], num_labels: int) -> tuple[float, float]:
    """Accuracy, and the unweighted mean over classes of F1 (a class never predicted nor present counts
    0 only if it occurs in `gold` or `predicted`: classes absent from both are left out, as sklearn's
    labels=present classes)."""
    if not gold:
        return 0.0, 0.0
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return accuracy, sum(f1s) / len(f1s) if f1s else 0.0


def score_classifier(model: LoraModel, examples: Sequence[ClassExample], records: Sequence[ClassRecord], labels: LabelSet,
                     pad_token_id: int, wanted: dict[str, str], batch_size: int = SCORING_BATCH, bf16: bool = True) -> list[ClassScore]:
    """Accuracy and macro-F1 of each of `wanted` ({label: adapter name, or BASE for the bare base})."""
    scores = []
    active = model.active_adapter
    gold = [e.label for e in examples]
    for label, name in wanted.items():
        if name == BASE:
            with model.disable_adapter():
                probs = predict_proba(model, examples, pad_token_id, batch_size, bf16)
        else:
            model.set_adapter(name, inference_mode=True)
            probs = predict_proba(model, examples, pad_token_id, batch_size, bf16)
        predicted = probs.argmax(-1).tolist()
        accuracy, f1 = accuracy_and_macro_f1(predicted, gold, labels.num_labels)
        rows = [{"where": r.where, "text": r.text, "label": labels.names[g], "predicted": labels.names[p],
                 "probability": round(float(probs[i, p]), 4)} for i, (r, g, p) in enumerate(zip(records, gold, predicted))]
        scores.append(ClassScore(label, accuracy, f1, rows))
    if active in model.peft_config:
        model.set_adapter(active, inference_mode=model.peft_config[active].inference_mode)
    return scores


def write_labels(adapter_dir: str | os.PathLike, labels: LabelSet) -> None:
    """Keep the class names beside the adapter (peft's files do not hold them)."""
    atomic_write_text(Path(adapter_dir) / LABELS_FILE, json.dumps({"id2label": labels.id2label, "by_id": labels.by_id}, indent=2) + "\n")


def read_labels(adapter_dir: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None) -> LabelSet:
    """The adapter's classes: labels.json, or LABEL_i after the saved head's size (adapters peft trained)."""
    path = Path(adapter_dir) / LABELS_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            names = [data["id2label"][str(i)] for i in range(len(data["id2label"]))]
            return LabelSet(tuple(names), by_id=bool(data.get("by_id")))
        except (ValueError, KeyError, TypeError) as err:
            raise LorakitError(f"{path} is damaged ({err}); delete it to name the classes LABEL_0, LABEL_1, ...") from None
    tensors = tensors if tensors is not None else read_adapter_weights(adapter_dir)
    heads = [v for k, v in tensors.items() if v.dim() == 2 and k.endswith(".weight")
             and any(k.startswith(f"{PREFIX}{h}.") for h in SEQ_CLS_HEAD_NAMES)]
    if not heads:
        raise LorakitError(f"{adapter_dir} holds no classification head (classifier / score); is it a SEQ_CLS adapter?")
    count = min(h.shape[0] for h in heads)
    return LabelSet(tuple(f"LABEL_{i}" for i in range(count)), by_id=True)


def is_classification_adapter(adapter_dir: str | os.PathLike) -> bool:
    return read_adapter_config(adapter_dir).task_type == "SEQ_CLS"


def load_classification_adapters(directories: dict[str, str], model_name: str = "default", dtype: str = "bfloat16"):
    """The base classifier with every SEQ_CLS adapter of `directories` ({name: dir}) loaded; their
    classes must agree. Returns (model, tokenizer, labels).

    Raises:
        LorakitError: an adapter that is not SEQ_CLS, or adapters with different classes.
    """
    from lorakit.models.classifier import load_classifier, load_classifier_tokenizer

    label_sets = {}
    for name, directory in directories.items():
        if not is_classification_adapter(directory):
            raise LorakitError(f"{directory} is not a classification adapter (task_type is not SEQ_CLS); score it by generation instead")
        label_sets[name] = read_labels(directory)
    labels = next(iter(label_sets.values()))
    differ = [n for n, s in label_sets.items() if s.names != labels.names]
    if differ:
        raise LorakitError(f"adapters {next(iter(label_sets))!r} and {differ[0]!r} have different classes; score them separately")
    tokenizer = load_classifier_tokenizer(model_name)
    model = LoraModel.wrap(load_classifier(model_name, labels.num_labels, labels.id2label, dtype, tokenizer.pad_token_id))
    for name, directory in directories.items():
        model.load_adapter(directory, name)
    return model, tokenizer, labels
