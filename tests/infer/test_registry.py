"""The adapter registry: many adapters on one base, by name, with an optional LRU cap."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.infer.registry import AdapterRegistry
from tests.helpers import make_tiny_llama, tiny_lora_model


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    tiny_lora_model().save_pretrained(root)  # a, b, c in sub-directories (ranks 8, 4, 2; different targets)
    return {name: root / name for name in "abc"}


def state(registry: AdapterRegistry) -> dict:
    return {k: v.clone() for k, v in registry.lora_model.state_dict().items()}


def test_load_list_unload_adapters_of_different_ranks(adapter_dirs) -> None:
    registry = AdapterRegistry(make_tiny_llama())
    for name in "abc":
        registry.load(name, adapter_dirs[name])
    assert registry.names() == ["a", "b", "c"]
    assert [registry.info(n).r for n in "abc"] == [8, 4, 2]
    assert registry.info("b").target_modules == ("k_proj", "o_proj", "v_proj")
    registry.unload("b")
    assert registry.names() == ["a", "c"]
    with pytest.raises(LorakitError, match="no adapter named 'b'; loaded adapters: a, c"):
        registry.info("b")


def test_a_cap_evicts_the_least_recently_used_unpinned_idle_adapter(adapter_dirs) -> None:
    registry = AdapterRegistry(make_tiny_llama(), max_loaded=2)
    registry.load("a", adapter_dirs["a"], pin=True)
    registry.load("b", adapter_dirs["b"])
    registry.load("c", adapter_dirs["c"])  # a is pinned: b goes
    assert registry.names() == ["a", "c"]
    mix = registry.acquire("c")  # c serves a request: nothing can go
    with pytest.raises(LorakitError, match="pinned or serving requests"):
        registry.load("b", adapter_dirs["b"])
    assert registry.names() == ["a", "c"]
    registry.release(mix)
    registry.load("b", adapter_dirs["b"])
    assert registry.names() == ["a", "b"]


def test_an_adapter_that_does_not_fit_leaves_the_registry_as_it_was(adapter_dirs, tmp_path) -> None:
    registry = AdapterRegistry(make_tiny_llama())
    registry.load("a", adapter_dirs["a"])
    before = state(registry)
    wrong = tiny_lora_model()
    bigger = make_tiny_llama(hidden_size=32, intermediate_size=64)  # other shapes
    from lorakit import LoraConfig, get_peft_model

    get_peft_model(bigger, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(LorakitError):
        registry.load("x", tmp_path)
    assert registry.names() == ["a"]
    after = state(registry)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    del wrong


def test_names_are_checked(adapter_dirs) -> None:
    registry = AdapterRegistry(make_tiny_llama())
    for bad in ("../up", "a b", "__base__", ""):
        with pytest.raises(LorakitError, match="not allowed"):
            registry.load(bad, adapter_dirs["a"])
    registry.load("a", adapter_dirs["a"])
    with pytest.raises(LorakitError, match="already loaded"):
        registry.load("a", adapter_dirs["b"])
    with pytest.raises(LorakitError, match="serving 1 request"):
        registry.acquire("a"), registry.unload("a")


def test_adapter_files_are_read_before_the_model_lock_is_taken(adapter_dirs, tmp_path) -> None:
    import os
    import shutil
    import threading

    registry = AdapterRegistry(make_tiny_llama())
    bad = tmp_path / "fifo"
    bad.mkdir()
    shutil.copy(adapter_dirs["a"] / "adapter_config.json", bad)
    os.mkfifo(bad / "adapter_model.safetensors")
    stepping, done = threading.Event(), threading.Event()

    def step_in_flight() -> None:  # an engine step holding the model for as long as the load takes
        with registry.lock:
            stepping.set()
            done.wait(30)

    holder = threading.Thread(target=step_in_flight)
    holder.start()
    stepping.wait(10)
    try:
        with pytest.raises(LorakitError, match="not a regular file"):
            registry.load("x", bad)  # refused from the files alone, while the step still holds the lock
    finally:
        done.set()
        holder.join()
    assert registry.names() == []
