"""Adapter arithmetic: one new adapter from weighted existing ones, with peft's `add_weighted_adapter` semantics.

Everything here is a pure function over factors: an adapter is its `LoraConfig` plus, per module path,
A (r, in) and B (out, r), with delta W = scaling * B A. The combined adapter always has
lora_alpha = r (scaling 1), as in peft, so the weights and scalings of the inputs live in its factors:

    cat:     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1 B_2 ...]  ->  B A = sum_i w_i s_i B_i A_i (exact)
    linear:  A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i
             ->  B A = sum_i w_i s_i B_i A_i + cross terms sqrt|..| B_i A_j (i != j): an approximation
    svd:     the best rank-k factorisation of sum_i w_i s_i B_i A_i (U S in B, Vh in A)

ties / dare_linear / dare_ties / magnitude_prune apply their merge to the A factors and to the B factors
separately (like linear); their `_svd` forms apply it to the full deltas and factorise the result.
Nothing here touches a model: lora/weighted.py reads a LoraModel's adapters into factors and puts the
result back (`add_weighted_adapter`); `lorakit combine` works on files alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.config import LoraConfig, replace
from lorakit.errors import LorakitError

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Merged on A and B separately; every adapter must have the same rank."""
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
"""Merged on the full deltas, then factorised to svd_rank (default: the largest input rank)."""
COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                     "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
SIGN_METHODS = ("total", "frequency")

Factors = tuple[Tensor, Tensor]
"""(A of shape (r, in), B of shape (out, r)) for one module."""


@dataclass
class AdapterFactors:
    """An adapter as data: its config and, per module path, its factors (A (r, in), B (out, r))."""

    config: LoraConfig
    factors: dict[str, Factors]
    name: str = "adapter"

    @property
    def scaling(self) -> float:
        """lora_alpha / r (or / sqrt(r) with rsLoRA): what delta W = scaling * B A multiplies by."""
        rank = math.sqrt(self.config.r) if self.config.use_rslora else self.config.r
        return self.config.lora_alpha / rank

    def scaling_of(self, path: str) -> float:
        """The scaling of the module at `path` (rank_pattern / alpha_pattern may give it its own)."""
        return self.config.layer_scaling(path)


# --- merging a list of tensors (peft's merge_utils) -----------------------------------------------
def _base_method(combination_type: str) -> str:
    """The tensor merge behind a combination type: "svd" is plain task arithmetic, like "linear"."""
    method = combination_type.removesuffix("_svd")
    return "linear" if method == "svd" else method


def _prune(tensor: Tensor, density: float, method: str, generator: torch.Generator | None) -> Tensor:
    if density >= 1:  # peft keeps everything (and warns); lorakit allows density == 1 quietly
        return tensor
    if method.startswith("dare"):
        # DARE: drop each entry with probability 1 - density, rescale the survivors by 1 / density.
        keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
        return tensor * keep / density
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def merge_tensors(tensors: list[Tensor], weights: Tensor, method: str, density: float | None = None,
                  majority_sign_method: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """Merge same-shaped tensors as peft's merge_utils does: `method` is linear, ties, dare_linear,
    dare_ties or magnitude_prune. TIES keeps, per entry, only the tensors agreeing with the elected
    sign and averages them; the sign is elected from the pruned, unweighted tensors."""
    if method != "linear":
        tensors = [_prune(t, density, method, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (n, *shape)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    total = stacked.sign().sum(dim=0) if majority_sign_method == "frequency" else stacked.sum(dim=0)
    agrees = stacked.sign() == torch.where(total >= 0, 1, -1)
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


# --- checks ----------------------------------------------------------------------------------------
def check_arguments(adapters: list[AdapterFactors], weights: list[float], combination_type: str,
                    density: float | None, majority_sign_method: str, svd_rank: int | None,
                    svd_clamp: float | None, svd_driver: str | None) -> str:
    """Refuse what peft refuses (or silently mishandles); returns the combination type that applies
    (peft uses "linear" whenever there is a single adapter).

    Raises:
        LorakitError: naming the argument that is wrong and how to fix it.
    """
    if combination_type not in COMBINATION_TYPES:
        raise LorakitError(f"unknown combination_type {combination_type!r}; use one of {', '.join(COMBINATION_TYPES)}")
    if not adapters:
        raise LorakitError("no adapters to combine; pass at least one adapter name")
    if len(weights) != len(adapters):
        raise LorakitError(f"{len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    _check_pruning(combination_type, density, majority_sign_method)
    _check_svd_options(adapters, combination_type, svd_rank, svd_clamp, svd_driver)
    if len({f.config.use_dora for f in adapters}) > 1:
        raise LorakitError("cannot combine DoRA and plain LoRA adapters (a DoRA magnitude has no plain LoRA equivalent); combine adapters of one kind")
    if len(adapters) == 1:
        return "linear"
    ranks = {f.name: f.config.max_rank for f in adapters}
    if combination_type in FACTOR_WISE and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{n} r={r}" for n, r in ranks.items())
        raise LorakitError(f"combination_type {combination_type!r} needs adapters of equal rank ({listed}); use 'cat' (exact) or 'svd' instead")
    return combination_type


def _check_pruning(combination_type: str, density: float | None, majority_sign_method: str) -> None:
    if _base_method(combination_type) not in ("linear", "cat"):
        if density is None:
            raise LorakitError(f"combination_type {combination_type!r} needs density (the fraction of values kept, in (0, 1]), e.g. density=0.5")
        if not 0 < density <= 1:
            raise LorakitError(f"density must be in (0, 1] (got {density}); it is the fraction of values kept, e.g. 0.5")
    elif density is not None:
        raise LorakitError(f"density is not used by combination_type {combination_type!r}; drop it, or use ties, dare_linear, dare_ties or magnitude_prune")
    if majority_sign_method not in SIGN_METHODS:
        raise LorakitError(f"majority_sign_method must be 'total' or 'frequency' (got {majority_sign_method!r})")


def _check_svd_options(adapters: list[AdapterFactors], combination_type: str, svd_rank: int | None,
                       svd_clamp: float | None, svd_driver: str | None) -> None:
    if combination_type not in SVD_TYPES and (svd_rank is not None or svd_clamp is not None):
        raise LorakitError(f"svd_rank and svd_clamp are not used by combination_type {combination_type!r}; drop them, or use 'svd'")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
        raise LorakitError(f"svd_rank must be a positive integer (got {svd_rank!r})")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise LorakitError(f"svd_clamp is a quantile and must be in [0, 1] (got {svd_clamp})")
    if svd_driver is not None and any(a.device.type != "cuda" for f in adapters for a, _ in f.factors.values()):
        raise LorakitError("svd_driver selects a cuSOLVER method and works only on CUDA tensors; leave it unset on CPU")


def combined_rank(adapters: list[AdapterFactors], combination_type: str, svd_rank: int | None) -> int:
    """peft's rule: the common rank for factor-wise types, the sum for cat, svd_rank (or the largest) for svd."""
    ranks = [f.config.max_rank for f in adapters]  # room for the largest rank_pattern rank, as peft
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in SVD_TYPES:
        return svd_rank or max(ranks)
    return ranks[0]


def combined_targets(adapters: list[AdapterFactors]) -> list[str] | str:
    """The union of the adapters' target_modules: names for lists, "(a)|(b)" for regex strings, as peft."""
    targets = [f.config.target_modules for f in adapters]
    if any(t is None for t in targets):
        raise LorakitError("an adapter's config has no target_modules; re-save it with the layers it adapts")
    if all(t == targets[0] for t in targets):
        return targets[0]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        raise LorakitError("cannot combine adapters whose target_modules mix a regex string and a list of names; re-save them with lists")
    return sorted(set().union(*targets))


def _check_svd_rank(rank: int, modules: dict[str, tuple[int, int]]) -> None:
    path, (out_features, in_features) = min(modules.items(), key=lambda item: min(item[1]))
    if rank > min(out_features, in_features):
        raise LorakitError(f"svd rank {rank} exceeds the size of {path} ({out_features} x {in_features}); pass svd_rank <= {min(out_features, in_features)}")


# --- combining -------------------------------------------------------------------------------------
def combine(adapters: list[AdapterFactors], weights: list[float], combination_type: str = "svd", *,
            svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
            svd_driver: str | None = None, density: float | None = None, majority_sign_method: str = "total",
            generator: torch.Generator | None = None, modules: list[str] | None = None) -> AdapterFactors:
    """Combine adapters into one, as peft's `add_weighted_adapter` does (see the module docstring).

    Args:
        adapters / weights: the inputs and one weight each (negative weights subtract).
        combination_type: one of COMBINATION_TYPES; a single adapter is always combined "linear" (peft).
        svd_rank, svd_clamp, svd_full_matrices, svd_driver: for the svd types, as in peft.
        density: fraction of values kept by ties / dare_* / magnitude_prune (and their _svd forms).
        majority_sign_method: "total" or "frequency", for ties and dare_ties.
        generator: the random source of DARE's drops; None draws from torch's global generator in peft's
            order (module by module, the A factors then the B factors), so a seeded run repeats peft's.
        modules: the module paths of the result, in order (default: every module any adapter has,
            first-seen order). peft walks the model's modules in order, which is what DARE's draws follow.

    Returns:
        The new adapter: r and lora_alpha = the combined rank, target_modules the union, other fields
        from the first adapter (use_rslora cleared: peft keeps it, which scales the result by sqrt(r)).

    Raises:
        LorakitError: an invalid argument or adapters that cannot be combined this way.
    """
    combination_type, config, order = plan(adapters, weights, combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
                                           svd_driver=svd_driver, density=density,
                                           majority_sign_method=majority_sign_method, modules=modules)
    factors = {}
    for path in order:
        present = [(f, w) for f, w in zip(adapters, weights) if path in f.factors]
        factors[path] = _combine_module(path, present, combination_type, config.r, density=density,
                                        majority_sign_method=majority_sign_method, generator=generator,
                                        svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)
    return AdapterFactors(config, factors, name="combined")


def plan(adapters: list[AdapterFactors], weights: list[float], combination_type: str, *, svd_rank: int | None = None,
         svd_clamp: float | None = None, svd_driver: str | None = None, density: float | None = None,
         majority_sign_method: str = "total", modules: list[str] | None = None) -> tuple[str, LoraConfig, list[str]]:
    """Every check `combine` makes, before any work: (the type that applies, the new config, the module order).

    Raises:
        LorakitError: an invalid argument or adapters that cannot be combined this way.
    """
    combination_type = check_arguments(adapters, weights, combination_type, density, majority_sign_method, svd_rank, svd_clamp, svd_driver)
    rank = combined_rank(adapters, combination_type, svd_rank)
    first = adapters[0].config
    # peft's replace of the first config, patterns dropped; an init that rewrites the base weights (PiSSA,
    # OLoRA, LoftQ) is not run again for the new adapter, whose factors are computed here
    init = True if isinstance(first.init_lora_weights, str) and first.init_lora_weights.startswith(("pissa", "olora", "loftq")) else first.init_lora_weights
    config = replace(first, r=rank, lora_alpha=rank, use_rslora=False, target_modules=combined_targets(adapters),
                     rank_pattern={}, alpha_pattern={}, init_lora_weights=init)
    order = modules or list(dict.fromkeys(path for f in adapters for path in f.factors))
    missing = [p for p in order if not any(p in f.factors for f in adapters)]
    if missing:
        raise LorakitError(f"no adapter has factors for {missing[0]}; the combined adapter would adapt a layer none of the inputs do")
    shapes = {p: _layer_shape(adapters, p) for p in order}
    if combination_type in SVD_TYPES:
        _check_svd_rank(rank, shapes)
    return combination_type, config, order


def _layer_shape(adapters: list[AdapterFactors], path: str) -> tuple[int, int]:
    """(out, in) of the layer at `path`; every adapter holding it must agree."""
    shapes = {f.name: (f.factors[path][1].shape[0], f.factors[path][0].shape[1]) for f in adapters if path in f.factors}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n}: {o} x {i}" for n, (o, i) in shapes.items())
        raise LorakitError(f"adapters disagree on the shape of {path} ({listed}); they were trained on different base models")
    return next(iter(shapes.values()))


def _combine_module(path: str, present: list[tuple[AdapterFactors, float]], combination_type: str, rank: int,
                    **options) -> Factors:
    dtype = present[0][0].factors[path][0].dtype
    pairs = [(f.factors[path][0].float(), f.factors[path][1].float(), f.scaling_of(path), w) for f, w in present]
    if combination_type == "cat":
        lora_a, lora_b = _cat(pairs, rank)
    elif combination_type in SVD_TYPES:
        lora_a, lora_b = _svd(pairs, combination_type, rank, **options)
    else:
        lora_a, lora_b = _factor_wise(pairs, combination_type, options["density"], options["majority_sign_method"], options["generator"])
    return lora_a.to(dtype), lora_b.to(dtype)


def _cat(pairs: list[tuple[Tensor, Tensor, float, float]], rank: int) -> Factors:
    """Stack the factors: exact. Rows past the present adapters' ranks stay zero (an input lacking this module)."""
    a_rows = torch.cat([a * weight * scaling for a, _, scaling, weight in pairs], dim=0)  # (sum r_i, in)
    b_cols = torch.cat([b for _, b, _, _ in pairs], dim=1)  # (out, sum r_i)
    lora_a = a_rows.new_zeros(rank, a_rows.shape[1])
    lora_b = b_cols.new_zeros(b_cols.shape[0], rank)
    lora_a[: a_rows.shape[0]] = a_rows
    lora_b[:, : b_cols.shape[1]] = b_cols
    return lora_a, lora_b


def _factor_wise(pairs: list[tuple[Tensor, Tensor, float, float]], combination_type: str, density: float | None,
                 majority_sign_method: str, generator: torch.Generator | None) -> Factors:
    """sqrt|w s| on both factors, the sign on A only, so each B_i A_i term carries w_i s_i."""
    scaled = [weight * scaling for _, _, scaling, weight in pairs]
    weights_a = torch.tensor([math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in scaled])
    weights_b = torch.tensor([math.sqrt(abs(v)) for v in scaled])
    lora_a = merge_tensors([a for a, _, _, _ in pairs], weights_a, combination_type, density, majority_sign_method, generator)
    lora_b = merge_tensors([b for _, b, _, _ in pairs], weights_b, combination_type, density, majority_sign_method, generator)
    return lora_a, lora_b


def _svd(pairs: list[tuple[Tensor, Tensor, float, float]], combination_type: str, rank: int, *, density: float | None,
         majority_sign_method: str, generator: torch.Generator | None, svd_clamp: float | None,
         svd_full_matrices: bool, svd_driver: str | None) -> Factors:
    """Merge the full deltas (out, in), then keep the top `rank` singular directions: B = U S, A = Vh."""
    deltas = [(b @ a) * scaling for a, b, scaling, _ in pairs]
    weights = torch.tensor([weight for _, _, _, weight in pairs])
    delta = merge_tensors(deltas, weights, _base_method(combination_type), density, majority_sign_method, generator)
    u, s, vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
    lora_b = u[:, :rank] @ torch.diag(s[:rank])  # (out, rank)
    lora_a = vh[:rank, :]  # (rank, in)
    if svd_clamp is not None:
        high = torch.quantile(torch.cat([lora_b.flatten(), lora_a.flatten()]), svd_clamp)
        lora_b, lora_a = lora_b.clamp(-high, high), lora_a.clamp(-high, high)
    return lora_a, lora_b
