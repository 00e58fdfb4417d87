"""Per-row adapters through ParamLora layers (lora/expert.py): each row of a batch its own adapter mix.

The experts see flattened tokens (B * T, C), so row b owns tokens b*T .. b*T+T-1. Two ways, the first
where it applies:

- **Low-rank per token** (transformers' experts modules: `use_experts_implementation` gives them the
  flags `has_gate`, `has_bias`, `is_transposed`, `_apply_gate`, which integrations/moe.py's forwards read).
  The experts' forward is run here with, for every (token, expert) pair, x W_e plus the Punica-style
  routed term ((x A_e^T) * the row's weight per bank column) B_e^T, where A_e / B_e hold every loaded
  adapter's expert-e factors side by side (a bank, zero for adapters this parameter lacks). Cost per pair:
  (in + out) * slots * rank, next to in * out for the base: a few percent at rank 16, whatever the mix.
- **Grouped** (any other module, e.g. a router's 2-D weight): the rows are grouped by mix and the
  module runs once per distinct mix on its group's tokens, with W + sum_j w_j delta_j folded in (one
  (E * in * out * rank) fold per mix: cheap for a router, not for a stack of experts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.routing import Routing

if TYPE_CHECKING:
    from lorakit.lora.expert import ParamLora

EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")


def routed_call(layer: ParamLora, chain: list[ParamLora], routing: Routing, args: tuple, kwargs: dict) -> Any:
    """The outermost ParamLora's module under `routing`: each token gets its own row's adapters."""
    if not args or not isinstance(args[0], torch.Tensor):
        raise LorakitError(f"{type(layer.real_module).__name__} takes no tensor first argument; per-row adapters cannot group its tokens")
    tokens = args[0].shape[0]
    if tokens % routing.rows:
        raise LorakitError(f"adapter routing has {routing.rows} rows but {type(layer.real_module).__name__} got "
                           f"{tokens} tokens; pass one adapter name per row")
    if _low_rank_applies(layer.real_module, chain, args, kwargs):
        return _experts_forward(layer.real_module, chain, routing, *args)
    return _grouped_call(layer, chain, routing, args, kwargs)


# --- low rank per token -------------------------------------------------------------------------
def _low_rank_applies(module: nn.Module, chain: list[ParamLora], args: tuple, kwargs: dict) -> bool:
    """transformers' experts contract: (hidden (N, C), top_k_index (N, k), top_k_weights (N, k)), its flags,
    and only its projections adapted."""
    flags = all(hasattr(module, f) for f in ("has_gate", "has_bias", "is_transposed", "_apply_gate", "num_experts"))
    return (flags and not kwargs and len(args) == 3 and not getattr(module, "_is_expert_parallel", False)
            and all(layer.parameter_name in EXPERT_PARAMETERS and not layer.disabled for layer in chain))


def _experts_forward(experts: nn.Module, chain: list[ParamLora], routing: Routing, hidden: torch.Tensor,
                     top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """integrations/moe.py's experts forward (up, gate, down, routing weights, sum over the top k), one
    expert at a time over the tokens routed to it, each projection plus its routed low-rank term."""
    banks = {layer.parameter_name: bank(layer, routing, hidden.dtype) for layer in chain}
    scales = _column_scales(routing, hidden.dtype, banks)  # {width: (B, S * width)}
    steps = hidden.shape[0] // routing.rows
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    out = torch.zeros_like(hidden)
    for expert in torch.unique(top_k_index).tolist():
        if not 0 <= expert < experts.num_experts:
            continue  # expert-parallel sentinels, as transformers skips them
        token, slot = torch.where(top_k_index == expert)
        rows = token // steps
        h = _project(experts, up_name, expert, hidden[token], banks.get(up_name), scales, rows)
        h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        h = _project(experts, "down_proj", expert, h, banks.get("down_proj"), scales, rows)
        if getattr(experts, "has_post_expert_norm", False):
            h = experts.post_expert_norm(h)
        out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def _project(experts: nn.Module, name: str, expert: int, x: torch.Tensor, banks: tuple | None,
             scales: dict, rows: torch.Tensor) -> torch.Tensor:
    """x through expert `expert`'s slice of parameter `name` (+ its bias), plus each token's adapters."""
    weight = getattr(experts, name)[expert]
    y = x @ weight.to(x.dtype) if experts.is_transposed else nn.functional.linear(x, weight.to(x.dtype))
    if experts.has_bias:
        y = y + getattr(experts, f"{name}_bias")[expert].to(y.dtype)
    if banks is not None:
        a_bank, b_bank = banks  # (E, S*R, in), (E, out, S*R)
        xa = nn.functional.linear(x, a_bank[expert]) * scales[a_bank.shape[1]][rows]
        y = y.addmm(xa, b_bank[expert].T)
    return y


@torch.no_grad()
def bank(layer: ParamLora, routing: Routing, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot's expert factors side by side: A (E, S*R, in) and scaling * B (E, out, S*R), R the
    layer's largest rank, zero for adapters it lacks; rebuilt only when the adapters or their weights change."""
    table = routing.table
    device = layer.lora_A[next(iter(layer.lora_A))].weight.device
    key = (table.version, table.weights_version, dtype, device)
    cached = getattr(layer, "_bank", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    experts, width, count = layer.num_experts, max(layer.r.values()), table.slots
    a_bank = torch.zeros(experts, count, width, layer.in_features, dtype=dtype, device=device)
    b_bank = torch.zeros(experts, layer.out_features, count, width, dtype=dtype, device=device)
    for name, slot in table.slot_of.items():
        if name in layer.lora_A:
            r = layer.r[name]
            a_bank[:, slot - 1, :r] = layer.lora_A[name].weight.view(experts, r, layer.in_features).to(dtype)
            b = layer.lora_B[name].weight.float().view(layer.out_features, r, experts).permute(2, 0, 1)  # (E, out, r)
            b_bank[:, :, slot - 1, :r] = (b * layer.scaling[name]).to(dtype)
    banks = (a_bank.view(experts, count * width, -1), b_bank.view(experts, layer.out_features, count * width))
    layer.__dict__["_bank"] = (key, banks)  # a cache, not a submodule or buffer (never saved)
    return banks


def _column_scales(routing: Routing, dtype: torch.dtype, banks: dict) -> dict[int, torch.Tensor]:
    """(B, S * width) per bank width: row b's weight for every rank column of every slot (0 where unused)."""
    scales = {}
    for a_bank, _ in banks.values():
        width = a_bank.shape[1] // max(routing.table.slots, 1)
        key = ("param_lora_scales", width, dtype)
        if key not in routing._scales:  # the routing's per-pass cache (lora/routing.py), shared by every layer
            per_slot = torch.zeros(routing.rows, routing.table.slots + 1, device=routing.slots.device)
            per_slot.scatter_add_(1, routing.slots.T, routing.weights.T)
            routing._scales[key] = per_slot[:, 1:].repeat_interleave(width, dim=1).to(dtype)
        scales[a_bank.shape[1]] = routing._scales[key]
    return scales


# --- grouped by mix -------------------------------------------------------------------------------
def _row_groups(routing: Routing) -> dict[tuple, list[int]]:
    """Rows by adapter mix: {((name, weight), ...): [rows]}; built once per routing (every layer shares it)."""
    cached = routing._scales.get("param_lora_groups")
    if cached is not None:
        return cached
    name_of = {slot: name for name, slot in routing.table.slot_of.items()}
    groups: dict[tuple, list[int]] = {}
    for row, (row_slots, row_weights) in enumerate(zip(routing.slots.T.tolist(), routing.weights.T.tolist())):
        mix = tuple(sorted((name_of[s], w) for s, w in zip(row_slots, row_weights) if s))
        groups.setdefault(mix, []).append(row)
    routing._scales["param_lora_groups"] = groups
    return groups


def _grouped_call(layer: ParamLora, chain: list[ParamLora], routing: Routing, args: tuple, kwargs: dict) -> Any:
    """Run the module once per distinct adapter mix, on the tokens of the rows that use it."""
    groups = _row_groups(routing)
    if len(groups) == 1:
        return layer.call_with(chain, dict(next(iter(groups))), args, kwargs)
    tokens = args[0].shape[0]
    steps = tokens // routing.rows
    device = args[0].device
    outputs = None
    for mix, rows in groups.items():
        index = (torch.tensor(rows, device=device)[:, None] * steps + torch.arange(steps, device=device)).flatten()
        part = layer.call_with(chain, dict(mix), tuple(_take(v, index, tokens) for v in args),
                               {k: _take(v, index, tokens) for k, v in kwargs.items()})
        outputs = _scatter(outputs, part, index, tokens)
    return outputs


def _take(value: Any, index: torch.Tensor, tokens: int) -> Any:
    """A group's share of a per-token argument (router indices and weights too); anything else as it is."""
    return value[index] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == tokens else value


def _scatter(outputs: Any, part: Any, index: torch.Tensor, tokens: int) -> Any:
    """Write a group's output(s) into the whole batch's, allocated on the first group."""
    if isinstance(part, tuple):
        return tuple(_scatter(None if outputs is None else o, p, index, tokens) for o, p in zip(outputs or (None,) * len(part), part))
    if not isinstance(part, torch.Tensor) or not part.dim():
        raise LorakitError("a module with adapted parameters returned something that is not per-token tensors; per-row adapters cannot run through it")
    if outputs is None:
        outputs = part.new_empty((tokens, *part.shape[1:]))
    outputs[index] = part
    return outputs
