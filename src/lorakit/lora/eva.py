"""EVA (Explained Variance Adaptation): lora_A from what each adapted layer sees, peft's
`init_lora_weights="eva"` and `initialize_lora_eva_weights`.

A data pass feeds every adapted layer's inputs (the tokens the attention and label masks keep) to one
incremental PCA per layer, batch after batch (the batches cycled), until each layer's top components stop
moving: cosine similarity to the previous batch's >= tau. Meanwhile the ranks are redistributed: a layer
may take up to round(r * rho) components, and the model's budget (the sum of the layers' r) goes to the
components explaining the largest share of their own layer's input variance. lora_A then holds each layer's
top components (B stays zero, so the adapter starts as a no-op); a layer whose rank changed has its
lora_alpha scaled by new_r / r (adjust_scaling_factors), so its scaling stays, and a layer given rank 0
loses its adapter. The new ranks and alphas land in rank_pattern / alpha_pattern keyed by full module path,
as peft writes them, so peft loads the adapter.

Layers that see the same input (q / k / v of one block) share one PCA. The PCA is peft's (sklearn's
IncrementalPCA in torch, torch.svd_lowrank seeded 42), so the components are peft's for the same model
and batches. Two differences: whitening divides each layer's components once (peft divides a shared
PCA's in place, once per layer sharing it), and a pass that never converges stops with an error after
`max_batches` forward passes instead of looping for ever.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from lorakit.config import LoraConfig, eva_settings, replace
from lorakit.device import model_device, to_device
from lorakit.errors import LorakitError
from lorakit.lora.layer import LoraLinear
from lorakit.lora.model import LoraModel

Forward = Callable[[nn.Module, dict], Any]
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")
RHO_CEILING = 1000  # peft's: a larger rho is capped at (largest weight dimension) // r


class IncrementalPCA:
    """peft.utils.incremental_pca.IncrementalPCA.partial_fit with lowrank=True (q = 2 n_components, 4 subspace
    iterations, seed 42): the same arithmetic in the same order and dtypes (the stacked update turns fp64 after
    the first batch, as there), so the same components."""

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.components: torch.Tensor | None = None  # (n_components, features), rows sign-fixed
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.n_samples_seen = torch.tensor([0])

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.to(torch.float32).clone()
        n_samples = x.shape[0]
        mean, var, n_total = _incremental_mean_and_var(x, self.mean, self.var, self.n_samples_seen.to(x.device))
        if self.components is None:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            correction = torch.sqrt((self.n_samples_seen.double() / n_total) * n_samples) * (self.mean - batch_mean)
            x = torch.vstack((self.singular_values.view((-1, 1)) * self.components, x, correction))
        with torch.random.fork_rng():
            torch.manual_seed(42)
            _, s, v = torch.svd_lowrank(x, q=self.n_components * 2, niter=4)
        vt = v.mH
        # sklearn's svd_flip (v-based): each component's largest entry positive, for deterministic signs
        signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])
        vt = vt * signs.view(-1, 1)
        self.explained_variance_ratio = (s**2 / torch.sum(var * n_total))[: self.n_components]
        self.n_samples_seen, self.mean, self.var = n_total, mean, var
        self.components, self.singular_values = vt[: self.n_components], s[: self.n_components]


def _incremental_mean_and_var(x: torch.Tensor, last_mean: torch.Tensor | None, last_var: torch.Tensor | None,
                              last_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running column mean and variance in fp64 (Chan et al.'s update, as sklearn and peft do it)."""
    new_count = torch.tensor([x.shape[0]], device=x.device)
    count = last_count + new_count
    last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if last_mean is None else last_mean * last_count
    new_sum = x.sum(dim=0, dtype=torch.float64)
    mean = (last_sum + new_sum) / count
    centred = x - new_sum / new_count
    correction = centred.sum(dim=0, dtype=torch.float64).square()
    new_unnormalised = centred.square_().sum(dim=0, dtype=torch.float64) - correction / new_count
    if last_var is None:
        return mean, new_unnormalised / count, count
    ratio = last_count.double() / new_count
    unnormalised = last_var * last_count + new_unnormalised + ratio / count * (last_sum / ratio - new_sum).square()
    return mean, unnormalised / count, count


class _LayerPCA:
    """One PCA and its convergence flags (peft's SVDHook without the hook)."""

    def __init__(self, n_components: int, tau: float) -> None:
        self.pca = IncrementalPCA(n_components)
        self.tau = tau
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    def update(self, x: torch.Tensor) -> None:
        if x.size(0) < self.pca.n_components:  # fewer kept tokens than components: this batch is skipped
            return
        previous = None if self.pca.components is None else self.pca.components.clone()
        self.pca.partial_fit(x)
        if previous is not None:
            self.converged = torch.nn.functional.cosine_similarity(self.pca.components, previous) >= self.tau


def token_index(batch: dict, eva: dict) -> torch.Tensor:
    """(N, 2) (row, position) of the tokens the PCA sees: attention_mask's (else all but a packed row's
    trailing `padding`), and with use_label_mask only those whose label is not label_mask_value (peft's rule)."""
    input_ids = batch["input_ids"]
    if "attention_mask" in batch:
        mask = batch["attention_mask"].bool()
    else:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
        for row, pad in enumerate(batch.get("padding", [])):
            if pad:
                mask[row, -pad:] = False
    if eva["use_label_mask"] and "labels" in batch:
        mask = mask & (batch["labels"] != eva["label_mask_value"])
    return mask.nonzero()


def default_forward(model: nn.Module, batch: dict) -> Any:
    """The wrapped model on the batch's model inputs (peft's forward_fn_dict, minus the loss)."""
    return model(**{k: batch[k] for k in MODEL_KEYS if k in batch})


def eva_layers(model: LoraModel, adapter_name: str) -> dict[str, LoraLinear]:
    """Path -> the LoraLinear layers carrying the adapter, in module order (peft's order)."""
    return {p: m for p, m in model.model.named_modules() if isinstance(m, LoraLinear) and adapter_name in m.lora_A}


def _fingerprint(x: torch.Tensor) -> tuple:
    """Equal for equal layer inputs (peft hashes the values; the bytes do the same without a Python list)."""
    data = x.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
    return tuple(x.shape), str(x.dtype), hashlib.blake2b(data, digest_size=16).digest()


class _Pass:
    """The forward hooks of one data pass: each layer's masked input goes to `sink(path, x)`."""

    def __init__(self, layers: dict[str, LoraLinear]) -> None:
        self.index: torch.Tensor | None = None
        self.sink: Callable[[str, torch.Tensor], None] = lambda path, x: None
        self.handles = [layer.register_forward_hook(self._hook(path)) for path, layer in layers.items()]

    def _hook(self, path: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            self.sink(path, x[self.index.to(x.device).T.unbind()])  # (N, in): the kept tokens
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def _eval_without_adapters(model: LoraModel) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield
    finally:
        model.train(training)


class Replay:
    """Batches that can be iterated again and again, from a function making one pass (EVA cycles them)."""

    def __init__(self, one_pass: Callable[[], Iterable[dict]]) -> None:
        self.one_pass = one_pass

    def __iter__(self) -> Iterator[dict]:
        return iter(self.one_pass())


def _batches_forever(batches: Iterable[dict]) -> Iterator[dict]:
    """The batches over and over (peft's cycle), each pass a fresh iteration: a list, a DataLoader, or any re-iterable."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise LorakitError("EVA's data pass got no batches (or an iterator already used up); give it a list "
                               "of batches or a re-iterable loader")


def _check(model: LoraModel, adapter_name: str, config: LoraConfig, layers: dict[str, LoraLinear],
           max_components: dict[str, int]) -> None:
    if config.init_lora_weights != "eva":
        raise LorakitError(f"adapter {adapter_name!r} has init_lora_weights {config.init_lora_weights!r}; EVA's data "
                           "pass is for adapters created with init_lora_weights 'eva'")
    if not layers:
        raise LorakitError(f"adapter {adapter_name!r} adapts no Linear / Conv1D layer, so EVA has nothing to initialise")
    for path, layer in layers.items():
        if max_components[path] > layer.in_features:
            raise LorakitError(f"EVA would fit {max_components[path]} components (r * rho) to {path}'s "
                               f"{layer.in_features} input features; lower r or eva_config rho")


@torch.no_grad()
def get_eva_state_dict(model: LoraModel, batches: Iterable[dict], adapter_name: str = "default",
                       forward_fn: Forward = default_forward, max_batches: int = 1000) -> dict[str, torch.Tensor]:
    """Each adapted layer's EVA lora_A (rank rows; 0 rows: the layer loses its adapter), from forward passes
    of `model` with its adapters disabled over `batches` (dicts of input_ids, and optionally attention_mask,
    labels, position_ids / padding as lorakit's loaders make them), cycled until every layer converged.

    Raises:
        LorakitError: not an EVA adapter, r * rho above a layer's input size, no batches, a layer the forward
            never reaches, or no convergence within `max_batches` forward passes.
    """
    config = model.peft_config[adapter_name]
    eva = eva_settings(config)
    layers = eva_layers(model, adapter_name)
    rho = eva["rho"]
    if rho > RHO_CEILING:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    ranks = {path: config.layer_rank_alpha(path)[0] for path in layers}
    max_components = {path: round(r * rho) for path, r in ranks.items()}
    _check(model, adapter_name, config, layers, max_components)
    device = model_device(model)
    hooks = _Pass(layers)
    try:
        with _eval_without_adapters(model):
            shared = _shared_inputs(model, batches, forward_fn, hooks, eva, device, layers)
            for group in shared.values():  # layers sharing an input take the largest of their sizes
                for path in group:
                    max_components[path] = max(max_components[p] for p in group)
            equal = {path: group[0] for group in shared.values() for path in group[1:]}
            pcas = {path: _LayerPCA(max_components[path], eva["tau"]) for path in layers if path not in equal}
            owner = {**{p: p for p in pcas}, **equal}  # peft's layer_hook_map, in its order
            ranks_now = _fit(model, batches, forward_fn, hooks, eva, device, pcas, owner, equal,
                             max_components, sum(ranks.values()), max_batches)
    finally:
        hooks.remove()
    state = {}
    for path, rank in ranks_now.items():
        pca = pcas[owner[path]]
        if not torch.all(pca.converged[:rank]):
            raise LorakitError(f"EVA assigned rank {rank} to {path}, whose components had not converged; "
                               "lower eva_config tau or give more batches")
        components = pca.pca.components[:rank]
        if eva["whiten"]:
            components = components / pca.pca.singular_values[:rank].sqrt().reshape(-1, 1)
        state[path] = components
    return state


def _shared_inputs(model: LoraModel, batches: Iterable[dict], forward_fn: Forward, hooks: _Pass, eva: dict,
                   device: torch.device, layers: dict[str, LoraLinear]) -> dict[tuple, list[str]]:
    """One forward of the first batch: groups (2 or more, in first-seen order) of layers whose inputs are equal."""
    first = next(iter(batches), None)
    if first is None:
        raise LorakitError("EVA's data pass got no batches; give it the first batches of the train data")
    first = to_device(first, device)
    prints: dict[str, tuple] = {}
    hooks.index, hooks.sink = token_index(first, eva), lambda path, x: prints.setdefault(path, _fingerprint(x))
    forward_fn(model, first)
    unseen = [p for p in layers if p not in prints]
    if unseen:
        raise LorakitError(f"the forward pass never reached {unseen[0]}, so EVA cannot see its inputs; "
                           "target layers the model runs (not the output head when only the decoder runs)")
    groups: dict[tuple, list[str]] = {}
    for path in layers:
        groups.setdefault(prints[path], []).append(path)
    return {k: v for k, v in groups.items() if len(v) > 1}


def _fit(model: LoraModel, batches: Iterable[dict], forward_fn: Forward, hooks: _Pass, eva: dict,
         device: torch.device, pcas: dict[str, _LayerPCA], owner: dict[str, str], equal: dict[str, str],
         max_components: dict[str, int], budget: int, max_batches: int) -> dict[str, int]:
    """peft's loop: a layer leaves the pass once the components its current rank needs converged (and comes
    back if they stop being so); ranks are redistributed after each forward. Returns the final ranks."""
    converged = {path: False for path in pcas}
    ranks = dict(max_components)
    active: set[str] = set(pcas)
    hooks.sink = lambda path, x: pcas[path].update(x) if path in active else None
    for step, batch in enumerate(_batches_forever(batches)):
        batch = to_device(batch, device)
        for path, pca in pcas.items():
            done = bool(torch.all(pca.converged[: ranks[path]]))
            if done != converged[path]:
                converged[path] = done
                (active.discard if done else active.add)(path)
        if all(converged.values()):
            return ranks
        if step == max_batches:
            raise LorakitError(f"EVA's components did not converge in {max_batches} batches; lower eva_config tau "
                               "or give it more varied batches")
        hooks.index = token_index(batch, eva)
        forward_fn(model, batch)
        if all(p.pca.components is not None for p in pcas.values()):
            ranks = _rank_distribution(pcas, owner, equal, max_components, budget)
    raise AssertionError("unreachable")  # _batches_forever never ends


def _rank_distribution(pcas: dict[str, _LayerPCA], owner: dict[str, str], equal: dict[str, str],
                       max_components: dict[str, int], budget: int) -> dict[str, int]:
    """The `budget` components with the largest explained-variance ratios, counted per layer (peft's order,
    so ties break as there); a layer sharing an input never ranks above the one whose PCA it uses."""
    ratios = {path: p.pca.explained_variance_ratio[: max_components[path]] for path, p in pcas.items()}
    keys = [path for path, source in owner.items() for _ in range(len(ratios[source]))]
    order = torch.cat([ratios[source] for source in owner.values()]).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    ranks = {path: counts.get(path, 0) for path in owner}
    for path, source in equal.items():
        if ranks[source] < ranks[path]:
            ranks[source], ranks[path] = ranks[path], ranks[source]
    return ranks


@torch.no_grad()
def initialize_lora_eva_weights(model: LoraModel, batches: Iterable[dict] | None = None,
                                eva_state_dict: dict[str, torch.Tensor] | None = None, adapter_name: str = "default",
                                forward_fn: Forward = default_forward, max_batches: int = 1000) -> LoraConfig:
    """peft's initialize_lora_eva_weights: EVA's lora_A (from `eva_state_dict`, or get_eva_state_dict over
    `batches`) put into the adapter, ranks and alphas changed where EVA moved them; returns the adapter's
    new config (also model.peft_config[adapter_name]), whose rank_pattern / alpha_pattern record them."""
    if eva_state_dict is None:
        if batches is None:
            raise LorakitError("initialize_lora_eva_weights needs batches (or an eva_state_dict)")
        eva_state_dict = get_eva_state_dict(model, batches, adapter_name, forward_fn, max_batches)
    config = model.peft_config[adapter_name]
    adjust = eva_settings(config)["adjust_scaling_factors"]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    removed = []
    for path, layer in eva_layers(model, adapter_name).items():
        r, alpha = config.layer_rank_alpha(path)
        lora_a = eva_state_dict.get(path)  # a layer the state dict lacks keeps its Kaiming A (peft: init True)
        new_rank = r if lora_a is None else lora_a.size(0)
        if new_rank == 0:
            _drop(model, path, layer, adapter_name)
            removed.append(path)
            continue
        if new_rank != r:
            alpha = alpha * (new_rank / r) if adjust else alpha  # peft's order of operations: the same float
            _resize(layer, adapter_name, new_rank, alpha, config)
        if lora_a is not None:
            layer.lora_A[adapter_name].weight.copy_(lora_a)
        if new_rank != config.r:
            rank_pattern[path] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[path] = alpha
    changes: dict[str, Any] = {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if removed:  # the layers left, by full path (peft lists them too)
        changes["target_modules"] = list(eva_layers(model, adapter_name))
    model.peft_config[adapter_name] = replace(config, **changes)
    model._adapters_changed()  # new A / B parameters: slot tables and banks rebuild
    model.set_adapter(model.active_adapter)  # the new parameters trainable, as the old ones were
    return model.peft_config[adapter_name]


def _resize(layer: LoraLinear, name: str, rank: int, alpha: float, config: LoraConfig) -> None:
    """Adapter `name` again at `rank` (A, B and DoRA's magnitude new, B zero), active as before."""
    active, dtype = list(layer.active_adapters), layer.lora_A[name].weight.dtype
    layer.delete_adapter(name)
    layer.add_adapter(name, rank, alpha, config.lora_dropout, config.use_rslora, dtype, use_dora=config.use_dora, init="eva")
    layer.active_adapters = active


def _drop(model: LoraModel, path: str, layer: LoraLinear, name: str) -> None:
    """EVA gave the layer rank 0: no adapter there; a layer left with none is its base layer again (as in peft)."""
    layer.delete_adapter(name)
    if not layer.lora_A:
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.model.get_submodule(parent_path) if parent_path else model.model, leaf, layer.base_layer)


__all__ = ["IncrementalPCA", "Replay", "get_eva_state_dict", "initialize_lora_eva_weights", "token_index", "default_forward"]
