"""`LoraModel`: a transformers model with named adapters, and the peft-shaped doors into it."""

from __future__ import annotations

import dataclasses
import operator
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.lora import merge as merge_ops, weighted
from lorakit.lora.inject import count_parameters, freeze_adapter, inject_adapter, mark_trainable, trainable_report
from lorakit.lora.expert import ParamLora, drop_empty, params_disabled
from lorakit.lora.layer import LoraLinear, ModulesToSave, adapters_disabled
from lorakit.lora.peft_format import load_adapter_weights, read_adapter_config, read_adapter_weights, save_adapter
from lorakit.lora.routing import BASE, RowSpec, SlotTable, build_routing, require_known, routed

_VERSION = operator.attrgetter("_version")  # in-place update counter of a tensor (summed once per routing)


class AdapterFiles(NamedTuple):
    """A peft-format adapter as read from its directory, not yet in any model."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]


def read_adapter_files(directory: str | os.PathLike) -> AdapterFiles:
    """Read and check an adapter directory's two files (LorakitError naming the problem otherwise)."""
    return AdapterFiles(read_adapter_config(directory), read_adapter_weights(directory))


class LoraModel(nn.Module):
    """Wraps a transformers model; attribute access falls through to it (`generate`, `config`, ...)."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default", adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config, adapter_dtype)

    # --- attribute fall-through, as peft does ---------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def forward(self, *args: Any, adapter_names: list[RowSpec] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; `adapter_names` (peft's name) gives each row its own adapter,
        `"__base__"` for none, or (lorakit's extension) a `{name: scale}` mix."""
        with routed(self.routing(adapter_names)):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[RowSpec] | None = None, **kwargs: Any) -> Any:
        """transformers' generate; with `adapter_names`, each row of the batch uses its own adapter."""
        if adapter_names is not None and (kwargs.get("num_beams", 1) > 1 or kwargs.get("num_return_sequences", 1) > 1):
            raise LorakitError("adapter_names works with one sequence per row; drop num_beams / num_return_sequences")
        with routed(self.routing(adapter_names)):
            return self.model.generate(*args, **kwargs)

    def routing(self, adapter_names: list[RowSpec] | None, device: torch.device | None = None):
        """The per-row routing for `adapter_names` (None: the active adapters, no routing)."""
        if adapter_names is None:
            return None
        if self.model.training:
            raise LorakitError("adapter_names is for inference; call model.eval() first (each row would train another adapter)")
        device = device or next(self.model.parameters()).device
        return build_routing(adapter_names, self.slot_table, device)

    def _adapters_changed(self) -> None:
        """Adapters were added or removed: the next routing builds a new slot table (and layers new banks)."""
        self.__dict__["_adapters_epoch"] = self.adapters_version + 1

    @property
    def adapters_version(self) -> int:
        """Changes whenever adapters are added or removed (cheap: no tensor is looked at)."""
        return self.__dict__.get("_adapters_epoch", 0)

    @property
    def slot_table(self) -> SlotTable:
        """Bank slots of the loaded adapters: stable per name while it stays loaded."""
        names = list(self.peft_config)
        table = self.__dict__.get("_slot_table")
        epoch = self.adapters_version
        if table is not None and table.version == epoch:
            # Tensor versions count in-place updates, so an adapter trained after its bank was built is seen.
            weights_version = sum(map(_VERSION, self.__dict__["_lora_params"]))
            if weights_version != table.weights_version:
                self.__dict__["_slot_table"] = table = dataclasses.replace(table, weights_version=weights_version)
            return table
        old = dict(table.slot_of) if table is not None else {}
        slot_of = {n: old[n] for n in names if n in old}
        free = (s for s in range(1, len(names) + len(old) + 2) if s not in slot_of.values())
        for name in names:
            if name not in slot_of:
                slot_of[name] = next(free)
        width = max((self.peft_config[n].max_rank for n in names), default=1)
        self.__dict__["_lora_params"] = [p for n, p in self.model.named_parameters() if "lora_" in n]
        weights_version = sum(map(_VERSION, self.__dict__["_lora_params"]))
        self.__dict__["_slot_table"] = SlotTable(slot_of, epoch, width, weights_version)
        return self.__dict__["_slot_table"]

    def get_base_model(self) -> nn.Module:
        return self.model

    # --- adapters ------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig, adapter_dtype: torch.dtype | None = None) -> None:
        if adapter_name == BASE:
            raise LorakitError(f"{BASE!r} is reserved for the base model; pick another adapter_name")
        if adapter_name in self.peft_config:
            raise LorakitError(f"adapter {adapter_name!r} already exists; pick another adapter_name or delete_adapter() it first")
        if config.base_model_name_or_path is None:
            config = LoraConfig(**{**config.__dict__, "base_model_name_or_path": getattr(self.model, "name_or_path", None) or None})
        config = with_classifier_head(config)
        self.peft_config[adapter_name] = inject_adapter(self.model, config, adapter_name, adapter_dtype)
        self._adapters_changed()
        self._activate(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make `adapter_name` (or several, summed) the active adapter(s) and the only trainable one
        (frozen too with `inference_mode`), as peft's `set_adapter` does."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        require_known(names, self.peft_config)
        for module in self.model.modules():
            if isinstance(module, (LoraLinear, ParamLora, ModulesToSave)):
                module.set_active(names)
        self.active_adapter = names[0]
        # The base is frozen in inference mode too: peft's report after from_pretrained counts 0 trainable
        # parameters (plus the biases `bias` selects, which peft leaves trainable).
        mark_trainable(self.model, names[0], self.peft_config[names[0]].bias)
        if inference_mode:
            freeze_adapter(self.model, names[0])

    def _activate(self, adapter_name: str) -> None:
        """set_adapter for lorakit's own bookkeeping: an adapter loaded for inference stays frozen."""
        self.set_adapter(adapter_name, inference_mode=self.peft_config[adapter_name].inference_mode)

    @property
    def active_adapters(self) -> list[str]:
        for module in self.model.modules():
            if isinstance(module, (LoraLinear, ParamLora)):
                return list(module.active_adapters)
        return [self.active_adapter]

    def delete_adapter(self, adapter_name: str) -> None:
        require_known([adapter_name], self.peft_config)
        for module in self.model.modules():
            if isinstance(module, (LoraLinear, ParamLora, ModulesToSave)) and (adapter_name in getattr(module, "lora_A", {}) or adapter_name in getattr(module, "modules_to_save", {})):
                module.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self._adapters_changed()
        if self.active_adapter == adapter_name and self.peft_config:
            self._activate(next(iter(self.peft_config)))

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Read a peft-format adapter into this model under `adapter_name`; nothing changes if it does not fit."""
        self.add_adapter_files(adapter_name, read_adapter_files(directory), is_trainable)

    def add_adapter_files(self, adapter_name: str, files: AdapterFiles, is_trainable: bool = False) -> None:
        """Add an adapter already read from disk (read_adapter_files); nothing changes if it does not fit.
        Split from load_adapter so a server reads files before it holds the lock its engine steps under."""
        config, tensors = dataclasses.replace(files.config), files.tensors
        config.inference_mode = not is_trainable
        active = self.active_adapter if self.peft_config else adapter_name
        if adapter_name == BASE:
            raise LorakitError(f"{BASE!r} is reserved for the base model; load the adapter under another name")
        if adapter_name in self.peft_config:
            raise LorakitError(f"adapter {adapter_name!r} already exists; load it under another adapter_name")
        try:
            self.peft_config[adapter_name] = inject_adapter(self.model, config, adapter_name)
            load_adapter_weights(self.model, tensors, adapter_name)
        except Exception:
            self._remove_partial(adapter_name)
            raise
        finally:
            self._adapters_changed()
        self._activate(active if active in self.peft_config else adapter_name)
        if not is_trainable:
            freeze_adapter(self.model, adapter_name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs: Any) -> None:
        """peft's add_weighted_adapter: a new adapter combining `adapters` (lora/weighted.py; the math in lora/arithmetic.py)."""
        with_parameters = [a for a in adapters if a in self.peft_config and self.peft_config[a].target_parameters]
        if with_parameters:
            raise LorakitError(f"adapter {with_parameters[0]!r} adapts target_parameters, which add_weighted_adapter does not combine yet")
        weighted.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)
        self._adapters_changed()

    def _remove_partial(self, adapter_name: str) -> None:
        self.peft_config.pop(adapter_name, None)
        for module in self.model.modules():
            if isinstance(module, (LoraLinear, ParamLora)) and adapter_name in module.lora_A:
                module.delete_adapter(adapter_name)
            elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
                module.delete_adapter(adapter_name)
        drop_empty(self.model)
        for path, module in list(self.model.named_modules()):
            if isinstance(module, LoraLinear) and not module.lora_A:
                merge_ops._set_child(self.model, path, module.base_layer)
            elif isinstance(module, ModulesToSave) and not module.modules_to_save:
                merge_ops._set_child(self.model, path, module.original_module)

    @classmethod
    def wrap(cls, model: nn.Module, adapter_name: str = "default") -> LoraModel:
        """A wrapper holding no adapter yet (for loading adapters into, as a registry does)."""
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper.model = model
        wrapper.peft_config = {}
        wrapper.active_adapter = adapter_name
        return wrapper

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False, **_: Any) -> LoraModel:
        """peft's `PeftModel.from_pretrained(base, adapter_dir)`."""
        wrapper = cls.wrap(model, adapter_name)
        wrapper.load_adapter(model_id, adapter_name, is_trainable)
        return wrapper

    # --- saving --------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None, **_: Any) -> None:
        """Write each adapter in peft's layout: the default one at the top, others in sub-directories.
        `path_initial_model_for_weight_conversion` (peft's name): a PiSSA / OLoRA adapter as saved before
        training, to write the adapter as plain LoRA for the original base (lora/conversion.py)."""
        for name in selected_adapters or list(self.peft_config):
            target = Path(save_directory) if name == "default" else Path(save_directory) / name
            save_adapter(self.model, self.peft_config[name], target, name, path_initial_model_for_weight_conversion)

    # --- reports, merging, disabling -----------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        print(trainable_report(self))

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        with adapters_disabled(self.model), params_disabled(self.model):
            yield

    def merge_adapter(self, safe_merge: bool = False) -> None:
        if safe_merge:
            merge_ops.check_finite_merge(self.model)
        for module in self.model.modules():
            if isinstance(module, (LoraLinear, ParamLora)):
                module.merge(safe=safe_merge)

    def unmerge_adapter(self) -> None:
        for module in self.model.modules():
            if isinstance(module, (LoraLinear, ParamLora)):
                module.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        return merge_ops.merge_and_unload(self.model, safe_merge, adapter_names, dtype)

    def unload(self) -> nn.Module:
        return merge_ops.unload(self.model)


SEQ_CLS_HEAD_NAMES = ("classifier", "score")
"""Classification heads by their transformers names; peft trains and saves them in full for SEQ_CLS."""


def with_classifier_head(config: LoraConfig) -> LoraConfig:
    """peft's SEQ_CLS rule: the new classification head (`classifier` / `score`) joins modules_to_save,
    so it is trained in full and saved with the adapter."""
    if config.task_type != "SEQ_CLS":
        return config
    saved = list(config.modules_to_save or [])
    return LoraConfig(**{**config.__dict__, "modules_to_save": saved + [n for n in SEQ_CLS_HEAD_NAMES if n not in saved]})


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside an adapter wrapper (lorakit's or peft's), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", autocast_adapter_dtype: bool = True) -> LoraModel:
    """Wrap `model` with a fresh adapter: A random, B zero, everything else frozen."""
    adapter_dtype = None if autocast_adapter_dtype else next(model.parameters()).dtype
    return LoraModel(model, peft_config, adapter_name, adapter_dtype)


PeftModel = LoraModel
PeftModelForCausalLM = LoraModel
