"""Per-row adapter routing: one forward pass in which every row of the batch uses its own adapter, a
weighted mix of adapters, or none (peft's `"__base__"`).

A row spec is an adapter name, `"__base__"`, or a mapping `{name: scale}`. The routing of a batch is
two (J, B) tensors: `slots[j, b]` is the bank slot of row b's j-th adapter (0 = none) and
`weights[j, b]` its scale; J is the most adapters any row mixes (1 for peft's `adapter_names`).
LoraLinear reads the routing of the current call from a context variable, so the transformers model
in between needs no new arguments, and concurrent calls in other threads each see their own."""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence, Union

import torch

from lorakit.errors import LorakitError

BASE = "__base__"
# The largest |scale| a row may give an adapter. peft takes any finite weight (negative ones subtract an
# adapter); beyond ~100 the bf16 delta swamps the base and the answer is noise (1e38 overflows to inf).
MAX_MIX_WEIGHT = 100.0
RowSpec = Union[str, Mapping[str, float], None]


@dataclass(frozen=True)
class SlotTable:
    """Which bank slot holds which adapter (slot 0 is the empty adapter). `version` changes whenever the
    set of adapters changes and `weights_version` whenever their weights do (in-place training updates
    included), so layers know when to rebuild their banks; `rank_width` is the largest rank loaded
    (every bank slot is padded to it)."""

    slot_of: Mapping[str, int]
    version: int
    rank_width: int
    weights_version: int = 0

    @property
    def slots(self) -> int:
        """Bank slots in use (1..slots; slot 0, the empty adapter, has none)."""
        return max(self.slot_of.values(), default=0)


@dataclass(frozen=True)
class Routing:
    slots: torch.Tensor  # (J, B) long, 0 = no adapter
    weights: torch.Tensor  # (J, B) float scales
    unit_weights: bool  # every used slot has weight 1: the scale multiply can be skipped
    table: SlotTable
    base_only: bool  # no row uses any adapter: LoraLinear layers add nothing
    single_slot: int  # > 0: every row uses this one slot at weight 1, so only its A and B are needed
    _scales: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def rows(self) -> int:
        return self.slots.shape[1]

    def slot_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, S): row b's weight for each bank slot 1..S (0 where the row does not use it). Built once per
        forward pass (every layer reads the same)."""
        key = ("slots", dtype)
        if key not in self._scales:
            per_slot = torch.zeros(self.rows, self.table.slots + 1, device=self.slots.device)
            per_slot.scatter_add_(1, self.slots.T, self.weights.T)  # (B, S + 1); slot 0 collects the unused
            self._scales[key] = per_slot[:, 1:].to(dtype)
        return self._scales[key]

    def column_scales(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, S * R): row b's weight for every rank column of every bank slot 1..S (0 where the row does
        not use that slot). The same for every layer, so it is built once per forward pass."""
        if dtype not in self._scales:
            self._scales[dtype] = self.slot_weights(torch.float32).repeat_interleave(self.table.rank_width, dim=1).to(dtype)
        return self._scales[dtype]


_ROUTING: ContextVar[Routing | None] = ContextVar("lorakit_routing", default=None)


def require_known(names: Iterable[str], known: Iterable[str]) -> None:
    """The one check that adapters are loaded, and its message (which lists the loaded ones).

    Raises:
        LorakitError: the first of `names` that is not in `known`.
    """
    known = list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise LorakitError(f"no adapter named {unknown[0]!r}; loaded adapters: {', '.join(known) or 'none'} "
                           f"(or {BASE!r} for the base model)")


def row_mix(spec: RowSpec) -> dict[str, float]:
    """A row spec as {adapter: scale}; "__base__" / None is the empty mix."""
    if spec is None or spec == BASE:
        return {}
    if isinstance(spec, str):
        return {spec: 1.0}
    if isinstance(spec, Mapping):
        mix = {str(k): float(v) for k, v in spec.items() if k != BASE}
        for name, weight in mix.items():
            if not math.isfinite(weight) or abs(weight) > MAX_MIX_WEIGHT:
                raise LorakitError(f"adapter {name!r} has mix weight {weight}; use a finite weight between "
                                   f"-{MAX_MIX_WEIGHT:g} and {MAX_MIX_WEIGHT:g}")
        return mix
    raise LorakitError(f"an adapter row spec must be a name, {BASE!r} or a {{name: scale}} mapping, not {type(spec).__name__}")


def build_routing(rows: Sequence[RowSpec], table: SlotTable, device: torch.device | None = None,
                  batch_invariant: bool = False) -> Routing:
    """Routing tensors for `rows`, with adapter names resolved to bank slots by `table`.
    `batch_invariant` keeps every row on the full-bank path, whatever the others use.

    Raises:
        LorakitError: a row names an adapter that is not loaded (the error lists the loaded ones).
    """
    slot_of = table.slot_of
    mixes = [row_mix(spec) for spec in rows]
    require_known(sorted({name for mix in mixes for name in mix}), sorted(slot_of))
    depth = max((len(mix) for mix in mixes), default=0) or 1
    slots = torch.zeros(depth, len(rows), dtype=torch.long)
    weights = torch.zeros(depth, len(rows))
    for b, mix in enumerate(mixes):
        # A fixed order (by name) per row: its sum is the same whatever else shares the batch.
        for j, name in enumerate(sorted(mix)):
            slots[j, b] = slot_of[name]
            weights[j, b] = mix[name]
    unit = bool(((weights == 1) | (slots == 0)).all())
    first = int(slots[0, 0])
    single = first if not batch_invariant and depth == 1 and first and unit and bool((slots == first).all()) else 0
    return Routing(slots.to(device), weights.to(device), unit, table, not bool(slots.any()), single)


def current_routing() -> Routing | None:
    return _ROUTING.get()


@contextmanager
def routed(routing: Routing | None) -> Iterator[None]:
    """Every LoraLinear forward inside the block applies `routing` (None: the active adapters)."""
    token = _ROUTING.set(routing)
    try:
        yield
    finally:
        _ROUTING.reset(token)
