"""Adapter arguments on the command line, parsed in one place for every command.

    [NAME=]DIR[:SCALE]   generate, eval    name defaults to adapter<i>; a scale only where the tail is a number
    NAME=DIR             serve             the name the requests use
    NAME=DIR:WEIGHT      combine           the weight is what follows the last colon

The name ends at the first "=" (a directory may hold one, a name may not need one); a weight or scale
must be a finite number. A bad spec is one LorakitError line saying what to write instead."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from lorakit.errors import LorakitError


class AdapterSpec(NamedTuple):
    name: str
    directory: str
    weight: float = 1.0


@dataclass(frozen=True)
class SpecForm:
    """One of the spec syntaxes above: what it must hold and how messages spell it."""

    syntax: str
    name_required: bool
    weight_word: str | None  # "scale" / "weight"; None: the form takes none (a colon is part of DIR)
    weight_required: bool = False


MIXED = SpecForm("[NAME=]DIR[:SCALE]", name_required=False, weight_word="scale")
NAMED = SpecForm("NAME=DIR", name_required=True, weight_word=None)
WEIGHTED = SpecForm("NAME=DIR:WEIGHT", name_required=True, weight_word="weight", weight_required=True)


def parse_adapter_spec(spec: str, form: SpecForm, index: int = 0, label: str = "--adapter") -> AdapterSpec:
    """One spec in `form`; `index` names an unnamed adapter (adapter<index>), `label` is the argument's
    name in messages (the flag, or "adapter" for a positional argument).

    Raises:
        LorakitError: a part the form needs is missing, or the weight is not a finite number.
    """
    name, equals, rest = spec.partition("=")
    if not equals:
        name, rest = ("" if form.name_required else f"adapter{index}"), spec
    directory, weight = rest, None
    if form.weight_word is not None:
        head, colon, tail = rest.rpartition(":")
        if form.weight_required or (head and _is_number(tail)):
            directory, weight = head, (tail if colon else None)
    if not name or not directory or (form.weight_required and weight is None):
        shown = directory if weight is not None and _is_number(weight) else rest  # the spec's DIR, as best it can be told
        example = f"{name or 'a'}={shown or 'DIR'}" + (":0.5" if form.weight_required else "")
        raise LorakitError(f"{label} {spec!r} is not {form.syntax}; write e.g. {example}")
    return AdapterSpec(name, directory, 1.0 if weight is None else _finite(weight, spec, name, directory, form))


def parse_adapter_specs(specs: list[str], form: SpecForm, label: str = "--adapter") -> list[AdapterSpec]:
    """Every spec of one command line, each adapter under its own name."""
    parsed = [parse_adapter_spec(spec, form, index, label) for index, spec in enumerate(specs)]
    names = [spec.name for spec in parsed]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated is not None:
        raise LorakitError(f"adapter name {repeated!r} is given twice; give each input its own name")
    return parsed


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _finite(text: str, spec: str, name: str, directory: str, form: SpecForm) -> float:
    if not _is_number(text):
        raise LorakitError(f"{form.weight_word} {text!r} in {spec!r} is not a number; write e.g. {name}={directory}:0.5")
    value = float(text)
    if not math.isfinite(value):
        raise LorakitError(f"{form.weight_word} {text!r} in {spec!r} must be a finite number")
    return value
