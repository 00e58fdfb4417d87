"""Many adapters on one base: load, list and unload peft-format adapters by name.

An optional cap on adapters held in memory evicts the least recently used one that is neither pinned
nor serving a request. Loading reads the files before it takes the model's lock and checks them
before the model changes, so a slow or bad adapter neither stalls the engine nor leaves the registry
changed. Every change to the model happens
under `lock`, which the generation engine holds for each step; the bookkeeping of which adapters
requests use has its own short lock, so submitting a request never waits for a step to end."""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.model import LoraModel, read_adapter_files
from lorakit.lora.routing import BASE, Routing, RowSpec, SlotTable, build_routing, require_known, row_mix

ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]+")


def valid_adapter_name(name: object) -> bool:
    """Letters, digits, '.', '_' and '-' only (safe in URLs, file names and metrics), and not "__base__"."""
    return isinstance(name, str) and ADAPTER_NAME.fullmatch(name) is not None and name != BASE


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    pinned: bool


class AdapterRegistry:
    """The one source of truth about the adapters a base serves: their names (the books requests pick
    from), slot table and versions, and the one check that a name is loaded. The engine asks it, never
    the LoraModel underneath."""

    def __init__(self, model: nn.Module, max_loaded: int | None = None) -> None:
        """`model`: a transformers model or a LoraModel around one (adapters it holds are registered)."""
        self.lora_model = model if isinstance(model, LoraModel) else LoraModel.wrap(model)
        self.lora_model.eval()
        self.max_loaded = max_loaded
        self.lock = threading.RLock()  # the model: held by the engine for each step, and by load / unload
        self._book = threading.Lock()  # names, pins, use counts: held for microseconds
        self._paths: dict[str, str] = {name: "" for name in self.lora_model.peft_config}
        self._pinned: set[str] = set()
        self._in_use: dict[str, int] = {}
        self._recent: OrderedDict[str, None] = OrderedDict((n, None) for n in self.lora_model.peft_config)

    # --- the model ---------------------------------------------------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model the adapters sit in (what a decoder runs)."""
        return self.lora_model.model

    # --- loading ----------------------------------------------------------------------------------
    def load(self, name: str, directory: str | os.PathLike, pin: bool = False) -> AdapterInfo:
        """Load the adapter in `directory` as `name` (evicting the least recently used one if at the cap).

        Raises:
            LorakitError: a bad name, a name already loaded, nothing evictable, or an adapter that does
                not fit the base; the registry is unchanged.
        """
        if not valid_adapter_name(name):
            raise LorakitError(f"adapter name {name!r} is not allowed; use letters, digits, '.', '_' and '-' only")
        self._check_new(name)
        files = read_adapter_files(directory)  # outside the lock: a slow (or bad) disk never stalls a step
        with self.lock:
            with self._book:
                self._check_new(name)
                victim = self._eviction_victim()
            self.lora_model.add_adapter_files(name, files)  # checks everything before changing the model
            if victim is not None:
                self.unload(victim)
            with self._book:
                self._paths[name] = str(Path(directory).resolve())
                self._recent[name] = None
                if pin:
                    self._pinned.add(name)
            return self.info(name)

    def _check_new(self, name: str) -> None:
        if name in self._paths:
            raise LorakitError(f"adapter {name!r} is already loaded; unload it first or pick another name")

    def unload(self, name: str) -> None:
        with self.lock:
            with self._book:  # once gone from the books, no new request can pick it
                self._check_known([name])
                if self._in_use.get(name):
                    raise LorakitError(f"adapter {name!r} is serving {self._in_use[name]} request(s); unload it when they finish")
                for table in (self._paths, self._recent, self._in_use):
                    table.pop(name, None)
                self._pinned.discard(name)
            self.lora_model.delete_adapter(name)

    def _eviction_victim(self) -> str | None:
        if self.max_loaded is None or len(self._paths) < self.max_loaded:
            return None
        for name in self._recent:  # oldest first
            if name not in self._pinned and not self._in_use.get(name):
                return name
        raise LorakitError(
            f"all {len(self._paths)} loaded adapters are pinned or serving requests; unload one or raise the cap ({self.max_loaded})"
        )

    # --- looking up -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._paths)

    def info(self, name: str) -> AdapterInfo:
        self._check_known([name])
        config = self.lora_model.peft_config[name]
        targets = config.target_modules if isinstance(config.target_modules, (list, tuple, set)) else [config.target_modules]
        return AdapterInfo(name, self._paths[name], config.r, config.lora_alpha, tuple(sorted(targets)), name in self._pinned)

    def _check_known(self, names: list[str]) -> None:
        require_known(names, self._paths)

    @property
    def version(self) -> int:
        """Changes whenever an adapter is loaded or unloaded (cheap: no tensor is looked at)."""
        return self.lora_model.adapters_version

    def slot_table(self) -> SlotTable:
        """Each loaded adapter's bank slot, with the versions of the set and of its weights (this sums
        every adapter tensor's version counter: ~1 ms on 8 adapters of the default model)."""
        return self.lora_model.slot_table

    def routing(self, specs: Sequence[RowSpec], device: torch.device, batch_invariant: bool = False) -> Routing | None:
        """The routing of rows with these specs (acquired ones), or None while no adapter is loaded."""
        if not self._paths:
            return None
        return build_routing(specs, self.slot_table(), device, batch_invariant=batch_invariant)

    # --- use by requests --------------------------------------------------------------------------
    def acquire(self, spec: RowSpec) -> dict[str, float]:
        """Mark the adapters of a request's row spec in use (never evicted until released)."""
        mix = row_mix(spec)
        with self._book:
            self._check_known(list(mix))
            for name in mix:
                self._in_use[name] = self._in_use.get(name, 0) + 1
                self._recent.move_to_end(name)
        return mix

    def release(self, mix: dict[str, float]) -> None:
        with self._book:
            for name in mix:
                if self._in_use.get(name):
                    self._in_use[name] -= 1
