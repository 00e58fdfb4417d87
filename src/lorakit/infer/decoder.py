"""A lean forward pass of a decoder-only LM over a slot KV cache, for generation.

What differs between families (norms and where they sit, multipliers, q/k norms, fused projections,
softcapping, sinks, sliding windows, rotary tables) is read from the model's Layout (infer/families.py);
a family without one is refused.

transformers' modules hold the weights; the projections run as fused, prepacked matmuls (infer/packed.py:
q/k/v as one, gate/up as one, each row's adapters joined in), resolved once per step rather than
checked at every call; norms, rotary embedding, attention and the cache are lorakit's, with as few
tensor operations per layer as the arithmetic allows: at one row a decode step is ~30 layers of small
ops around bandwidth-bound matmuls, and each op and Python call costs microseconds (this loop took a
one-row step of the default model from 15.5 to ~12 ms against running transformers' modules). With
`compile`, inductor fuses each chunk of layers' small ops (infer/compiled.py).
Rows of a batch are cache slots 0..B-1, so the cache is read as a view, never gathered: the engine
keeps its running requests in the lowest slots.

Shapes: B rows, T new tokens per row, H query heads, KVH key/value heads (G = H / KVH share one),
D head size, L tokens cached per slot at most."""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Protocol, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.errors import LorakitError
from lorakit.infer.cache import SlotCache
from lorakit.infer.compiled import GraphProjections, at_chunk, running
from lorakit.infer.families import SLIDING, Layout, layout_of
from lorakit.infer.packed import QUANTIZERS, FusedLinear, Projections, StepProjections
from lorakit.kernels import decode_attention, routed_lora
from lorakit.lora.routing import Routing, routed

SMALL_ATTENTION = 192  # cached positions up to which one row's decode attention runs in fp32 (0.6-0.7 ms a step; a wash at 256)
COMPILED_LAYERS = 5  # layers per compiled call: the whole default model in one graph ran no faster and took 4x as long to compile



class Norms:
    """A model's RMSNorms as weights, so a norm is two or three tensor calls and a compiled step can take
    the weight as an input. `kind` is the Layout's norm arithmetic: "llama" w * rms(x) rounded first
    (torch.rms_norm computes in fp32 and rounds to the input's dtype, as transformers' does); "fp32"
    (w * rms(x)) in fp32, rounded last (OLMo2, gpt-oss); "gemma" the same with 1 + w. Norms whose epsilon
    cannot be read, or differ, are kept as their modules. A slot may be None (no norm there): identity."""

    def __init__(self, modules: list[nn.Module | None], kind: str = "llama") -> None:
        present = [m for m in modules if m is not None]
        epsilons = {getattr(m, "variance_epsilon", getattr(m, "eps", None)) for m in present}
        self.kind = kind
        self.plain = None not in epsilons and len(epsilons) == 1 and all(
            type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor) for m in present)
        self.eps = epsilons.pop() if self.plain else 0.0
        self._weights = [m.weight if m is not None else None for m in modules] if self.plain else []  # the parameters, held
        self._seen: list[int] = []
        self.norms: list[torch.Tensor | nn.Module | None] = self._derive() if self.plain else list(modules)

    def _derive(self) -> list[torch.Tensor | None]:
        # Detached: the same storage for Llama's, and no requires_grad flag that loading an adapter (which
        # freezes the base) would flip under a compiled graph's guards, recompiling every graph.
        self._seen = [w.data_ptr() if w is not None else 0 for w in self._weights]
        if self.kind == "llama":
            return [w.detach() if w is not None else None for w in self._weights]
        offset = 1.0 if self.kind == "gemma" else 0.0
        return [w.detach().float() + offset if w is not None else None for w in self._weights]

    def refresh(self) -> None:
        """Follow weights whose storage was replaced since (`param.data = ...`, as Module.to does): ~5 us."""
        if any(w is not None and w.data_ptr() != seen for w, seen in zip(self._weights, self._seen)):
            self.norms = self._derive()

    def __call__(self, norm: torch.Tensor | nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        if norm is None:
            return x
        if not isinstance(norm, torch.Tensor):
            return norm(x)
        if self.kind == "llama":
            return torch.rms_norm(x, (x.shape[-1],), eps=self.eps) * norm
        return (torch.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * norm).to(x.dtype)


def activation(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """An MLP's activation as a function: SiLU (every Llama-style model's) without a module call."""
    return F.silu if type(module).__name__ in ("SiLU", "SiLUActivation") else module


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == swap_halves(x) * signed_sin(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding (rotate-half form), x * cos + rotate_half(x) * sin, on (..., D) in four
    ops: the halves swapped by one flip, the sign carried by `signed_sin`. Bit-equal to transformers'.
    Tables narrower than D rotate the leading dimensions only (Phi-3's partial rotary)."""
    *lead, dim = x.shape
    width = cos.shape[-1]
    if width < dim:
        return torch.cat((rotate(x[..., :width], cos, sin_signed), x[..., width:]), dim=-1)
    swapped = x.view(*lead, 2, dim // 2).flip(-2).view(*lead, dim)
    return x * cos + swapped * sin_signed


def decoder_parts(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model` of a LlamaForCausalLM) of a family the engine knows (its Layout
    read, so an unknown family is refused here), checked to have the parts every family has."""
    layout_of(model)
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not all(hasattr(inner, name) for name in ("rotary_emb", "embed_tokens", "norm")) \
            or not hasattr(layers[0], "self_attn"):
        raise LorakitError(f"the generation engine runs decoder-only LMs with transformers' layout; {type(model).__name__} "
                           "is not one: use transformers' generate for it")
    return inner


def _head_name(model: nn.Module) -> str:
    """The attribute that holds the output projection (`lm_head` for every family the engine runs)."""
    head = model.get_output_embeddings()
    return next(name for name, child in model.named_children() if child is head)


def _gated(mlp: nn.Module, layout: Layout) -> bool:
    """The family's gated MLP, down(act(gate(x)) * up(x)), as fused projections; any other MLP (MoE
    blocks, a replaced module) runs as its module."""
    return layout.gate_up is not None and all(hasattr(mlp, name) for name in (*layout.gate_up, "down_proj", layout.activation))


def _require(module: nn.Module, names: Sequence[str], family: str) -> None:
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise LorakitError(f"this {family} model has no {', '.join(missing)} where its family's layers have them; "
                           "the generation engine cannot run it (use transformers' generate)")


class DecodeStep(NamedTuple):
    """The tensors every layer of one decode step reads besides its weights and cache (a compiled
    chunk takes them as its leading arguments, in this order)."""

    hidden: torch.Tensor  # (B, 1, C): the running layer's input
    cos: torch.Tensor  # (B, 1, 1, D) rotary tables at the rows' positions
    sin_signed: torch.Tensor  # (B, 1, 1, D), see signed_sin
    visible: torch.Tensor | None  # what keeps each row to its own positions (SlotDecoder._visible)
    positions: torch.Tensor  # (B,) the new tokens' positions
    row_index: torch.Tensor  # (B,) 0..B-1, the rows' cache slots
    local_cos: torch.Tensor | None = None  # the second rotary table, for sliding layers (Gemma 3); else None
    local_sin_signed: torch.Tensor | None = None
    visible_window: torch.Tensor | None = None  # the mask of sliding layers, where a window cuts this step; else None


class Project(Protocol):
    """Group g of the step's projections applied to x (StepProjections eagerly, GraphProjections in a graph)."""

    routing: Routing | None

    def __call__(self, group: int, x: torch.Tensor) -> torch.Tensor: ...


def _mark_varying(step: DecodeStep, cache: SlotCache) -> None:
    """Mark a compiled step's varying sizes dynamic: its rows (one row is a graph of its own) and the
    cache span. Marks matter only when a graph is traced, and cost ~80 us a call, so warm_up makes them."""
    if step.hidden.shape[0] > 1:
        for tensor in step:  # every field has the rows first
            if tensor is not None:
                torch._dynamo.mark_dynamic(tensor, 0)
    if step.visible.dim() == 4:  # a mask (B, 1, 1, span) rather than the rows' lengths
        torch._dynamo.mark_dynamic(step.visible, 3)
    for tensor in cache.keys + cache.values:
        torch._dynamo.mark_dynamic(tensor, 2)


def _chunk_size(local: Sequence[bool]) -> int:
    """Layers per compiled call: COMPILED_LAYERS, or the period of the layers' kinds (Gemma 3's five
    sliding layers and a global one: 6) where it divides the model, so that every chunk is one graph."""
    if not any(local):
        return COMPILED_LAYERS
    for period in range(2, 9):
        if len(local) % period == 0 and all(local[i] == local[i % period] for i in range(len(local))):
            return period
    return COMPILED_LAYERS


def _softcap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    return scores if cap is None else torch.tanh(scores / cap) * cap


def _window_mask(queries: torch.Tensor, keys: int, window: int | None) -> torch.Tensor:
    """(T, keys) True where the query at position queries[t] may look: causal, and within the window."""
    span = torch.arange(keys, device=queries.device)[None, :]
    visible = span <= queries[:, None]
    return visible & (span > queries[:, None] - window) if window is not None else visible


class SlotDecoder:
    """Prefill and decode steps of one decoder-only causal LM over a SlotCache."""

    def __init__(self, model: nn.Module, pack: bool = True, compile: bool = False, quantization: str | None = None) -> None:
        """`pack=False` runs every projection as its own module (for comparison; packing is used only
        where it applies, see infer/packed.py); `compile` compiles the decode step where it applies
        (infer/compiled.py: a CPU model of a Llama-like family whose layers all have its norms and gated
        MLP) and, in bf16 on a CPU, attends and adds each row's adapters through lorakit's C++ kernels
        (kernels/decode_attention.py, kernels/routed_lora.py). `quantization` ("int8" | "q4_0"): every
        projection's base weights (the output head's too) quantized for kernels/quant_matmul.py, the
        adapters added on top; for a bf16 model on a CPU."""
        if quantization is not None and quantization not in QUANTIZERS:
            raise LorakitError(f"unknown engine quantization {quantization!r}; use one of {', '.join(QUANTIZERS)}")
        self.model = model
        self.inner = decoder_parts(model)
        self.layout = layout = layout_of(model)
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = layout.attention_scale
        layers = self.inner.layers
        windows = {w for w in layout.windows if w is not None}
        if len(windows) > 1 or len(layout.windows) != len(layers):
            raise LorakitError(f"this {layout.family} model's sliding windows ({layout.windows}) are not one size over its "
                               "layers; the generation engine cannot run it (use transformers' generate)")
        self.window = windows.pop() if windows else None
        slots = (layout.pre_attention, layout.post_attention, layout.pre_mlp, layout.post_mlp)
        for layer in layers:
            _require(layer, [s for s in slots if s is not None], layout.family)
            _require(layer.self_attn, layout.qkv + ("o_proj",) + (("sinks",) if layout.sinks else ()), layout.family)
        self.norm = Norms([getattr(layer, s) if s is not None else None for layer in layers for s in slots] + [self.inner.norm],
                          layout.norm)
        self.gated = [_gated(layer.mlp, layout) for layer in layers]
        self.mlps = [layer.mlp for layer in layers]  # held: module attribute look-ups cost ~1 us each, per layer per step
        self.activations = [activation(getattr(mlp, layout.activation)) if gated else None for mlp, gated in zip(self.mlps, self.gated)]
        # q / k norms as weights where they are RMSNorms of the family's kind (2 per layer: q, k), so a compiled chunk takes them
        self.qk = Norms([m for layer in layers for m in (layer.self_attn.q_norm, layer.self_attn.k_norm)], layout.norm) if layout.qk_norm else None
        self.sinks = [layer.self_attn.sinks for layer in layers] if layout.sinks else None
        self.local_rope = [kind == SLIDING for kind in layout.rope_types] if layout.rope_types else [False] * len(layers)
        weight = self.inner.embed_tokens.weight
        on_cpu = weight.device.type == "cpu"
        # With `compile`, in bf16 on a CPU, lorakit's C++ kernels add each row's adapters (packed groups
        # only: kernels/routed_lora.py) and attend (head sizes up to 256: kernels/decode_attention.py).
        native = compile and on_cpu and weight.dtype == torch.bfloat16
        lora_kernel = routed_lora.load() if native and pack else None
        groups: list[FusedLinear] = []  # per layer: q/k/v, o, then gate/up and down for gated MLPs; the output head last
        self.first_group: list[int] = []  # each layer's first group
        for layer, gated in zip(layers, self.gated):
            self.first_group.append(len(groups))
            attention, mlp = layer.self_attn, layer.mlp
            groups += [FusedLinear(attention, list(layout.qkv), pack, lora_kernel, quantization),
                       FusedLinear(attention, ["o_proj"], pack, lora_kernel, quantization)]
            if gated:
                groups += [FusedLinear(mlp, list(layout.gate_up), pack, lora_kernel, quantization),
                           FusedLinear(mlp, ["down_proj"], pack, lora_kernel, quantization)]
        groups.append(FusedLinear(model, [_head_name(model)], pack, lora_kernel, quantization))
        self.projections = Projections(groups)
        self.widths = [sum(m.out_features for m in g.modules()) for g in groups]  # each group's output columns
        self.graph_projections = GraphProjections(self.widths)
        # Compiled where every layer computes alike up to its weights: the norms (q / k's too) as weights, gated MLPs
        # with one activation, no sinks. Layers that differ by kind (Gemma 3's sliding and global) get a graph per
        # chunk pattern, and chunks follow the pattern's period so that all of them share one.
        uniform = (self.norm.plain and all(self.gated) and len({type(a) for a in self.activations}) == 1
                   and (self.qk is None or self.qk.plain) and not layout.sinks)
        self.chunk = _chunk_size(self.local_rope)
        # Only the row count and the cache span vary (marked while warming up); every other size is the
        # model's, and inductor's loops over static sizes (head size, widths) ran the glue 25% faster.
        self.compiled = torch.compile(self._decode_chunk, dynamic=False) if compile and uniform and on_cpu else None
        plain_attention = layout.attention_softcap is None and not layout.sinks
        self.attention_kernel = decode_attention.load() if native and self.head_dim <= 256 and plain_attention else None
        self._tracing = False  # warm_up is running: mark the sizes that vary on the graphs' inputs

    def allocate(self, slots: int, length: int) -> SlotCache:
        """A cache of `slots` rows of up to `length` positions."""
        weight = self.inner.embed_tokens.weight
        return SlotCache.allocate(len(self.inner.layers), slots, self.kv_heads, length, self.head_dim, weight.dtype, weight.device)

    def warm_up(self, cache: SlotCache) -> None:
        """Take now, not during the first requests, what decoding will take: the packed base weights
        (infer/packed.py), and when compiling, the graphs decoding meets: one row over few and over many
        cached positions (attention differs, SMALL_ATTENTION) and several rows. Writes into the cache's
        slots: call it before any request holds one. The graphs are traced with only the rows and the
        span varying (_mark_varying), so no later shape in these classes traces again. (Spans of 128 and
        more: a span equal to the row count would be tied to it by torch.compile's duck sizing.)"""
        self.projections.warm()
        if self.compiled is None:
            return
        spans = [128] + ([SMALL_ATTENTION + 64] if cache.limit >= SMALL_ATTENTION + 64 else [])
        shapes = [(1, span) for span in spans] + ([(2, 128)] if cache.slots > 1 else [])
        self._tracing = True
        try:
            for rows, span in shapes:
                self.decode(cache, torch.zeros(rows, dtype=torch.long), torch.full((rows,), min(span, cache.limit) - 1), None)
        except Exception as error:  # inductor needs a C++ compiler, among other things: decode eagerly then
            warnings.warn(f"compiling the decode step failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                          "decoding eagerly", stacklevel=2)
            self.compiled = None
        finally:
            self._tracing = False
        cache.fit(1, shrink=True)

    @torch.inference_mode()
    def prefill(self, cache: SlotCache, first_slot: int, input_ids: torch.Tensor, lengths: torch.Tensor,
                routing: Routing | None, start: int = 0) -> torch.Tensor:
        """Run right-padded prompts (B, T) into slots first_slot.. first_slot+B-1 from position `start`
        (positions before it already cached: a shared prefix, infer/prefix.py), each row with its adapters
        under `routing` (None: no adapter loaded); returns the logits after each row's last real token
        (`lengths` counts from `start`), (B, V) in the model's dtype.

        Padding sits after each prompt, so causal attention never lets a real token see it; its cache
        entries are overwritten by the first decoded tokens."""
        rows, steps = input_ids.shape
        end = start + steps
        cache.fit(end)
        self._refresh_norms()
        positions = torch.arange(start, end, device=input_ids.device)
        hidden, tables = self._embed(input_ids, positions.expand(rows, steps))
        slots = slice(first_slot, first_slot + rows)
        project = self._resolve(routing)
        for index in range(len(self.inner.layers)):
            group = self.first_group[index]
            norms = self._layer_norms(index)
            cos, sin_signed = tables[self.local_rope[index]]
            q, k, v = self._attention_inputs(index, group, hidden, cos, sin_signed, norms[0], project)  # (B, H|KVH, T, D)
            keys, values = cache.keys[index], cache.values[index]
            keys[slots, :, start:end] = k
            values[slots, :, start:end] = v
            if start:
                k, v = keys[slots, :, :end], values[slots, :, :end]
            out = self._prefill_attention(index, q, k, v, positions)
            hidden = self._finish_layer(index, group, hidden, out.transpose(1, 2).reshape(rows, steps, -1), norms, project)
        return self._logits(hidden[torch.arange(rows), lengths - 1], project)  # after each prompt's last real token

    def _prefill_attention(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queries at `positions` (B, H, T, D) over the keys and values of positions 0.. (B, KVH, end, D),
        causally and within the layer's window: SDPA, or the scores written out where the family caps
        them or adds sinks."""
        window = self.layout.windows[index]
        cut = window is not None and int(positions[-1]) >= window  # a window that hides some key from some query
        start = int(positions[0])
        mask = _window_mask(positions, k.shape[2], window) if start or cut else None
        if self.layout.attention_softcap is None and not self.layout.sinks:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                  enable_gqa=self.kv_heads != self.heads)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = _softcap(torch.matmul(q, k.transpose(2, 3)) * self.scale, self.layout.attention_softcap)
        mask = mask if mask is not None else _window_mask(positions, k.shape[2], None)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(self._softmax(index, scores).to(v.dtype), v)

    def _softmax(self, index: int, scores: torch.Tensor) -> torch.Tensor:
        """Softmax over the last dim in fp32, (B, H, ..., span); with sinks (gpt-oss), each head's learned
        logit joins the normalisation and is dropped after it."""
        if self.sinks is None:
            return torch.softmax(scores, dim=-1, dtype=torch.float32)
        rows, heads = scores.shape[:2]
        sink = self.sinks[index].to(scores.dtype).view(1, heads, *([1] * (scores.dim() - 2))).expand(*scores.shape[:-1], 1)
        return torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1, dtype=torch.float32)[..., :-1]

    @torch.inference_mode()
    def decode(self, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor, routing: Routing | None,
               rowwise: bool = False) -> torch.Tensor:
        """One new token for each of the rows in slots 0..B-1, at `positions` (B,), each row with its
        adapters under `routing` (None: no adapter loaded); returns (B, V) logits in the model's dtype.

        `rowwise` attends row by row over exactly each row's own tokens, so a row's result does not
        depend on the other rows' lengths (the batch-invariant mode; never compiled)."""
        rows = tokens.shape[0]
        cache.fit(int(positions.max()) + 1, shrink=True)
        self._refresh_norms()
        hidden, tables = self._embed(tokens[:, None], positions[:, None])
        (cos, sin_signed), (local_cos, local_sin) = tables[False], tables.get(True, (None, None))
        cut = self.window is not None and int(positions.max()) >= self.window
        step = DecodeStep(hidden, cos, sin_signed, self._visible(positions, cache.capacity, rowwise), positions,
                          torch.arange(rows, device=tokens.device), local_cos, local_sin,
                          self._mask(positions, cache.capacity, self.window) if cut and not rowwise else None)
        project = self._resolve(routing)
        if self.compiled is not None and not rowwise and not cut:
            hidden = self._decode_compiled(cache, step, project)
        else:
            position = int(positions[0]) if rows == 1 else None
            for index in range(len(self.inner.layers)):
                hidden = self._decode_layer(index, self.first_group[index], step, cache.keys[index], cache.values[index],
                                            project, position, rowwise)
                step = step._replace(hidden=hidden)
        return self._logits(hidden[:, 0], project)

    def _decode_compiled(self, cache: SlotCache, step: DecodeStep, project: StepProjections) -> torch.Tensor:
        """The decode step's layers through the compiled chunks; their projections reach `project` through
        compiled.py's thread-local (a graph cannot take it as an argument)."""
        # Every input of a compiled graph made here, in inference mode and contiguous: a tensor that
        # differs in either way from the one a graph was traced with makes torch.compile trace anew.
        step = step._replace(hidden=step.hidden.clone(memory_format=torch.contiguous_format), positions=step.positions.clone())
        if self._tracing:
            _mark_varying(step, cache)
        layers = len(self.inner.layers)
        with running(project):
            for first in range(0, layers, self.chunk):
                last = min(first + self.chunk, layers)
                at_chunk(self.first_group[first])
                norms = [n for index in range(first, last) for n in self._layer_norms(index)]
                qk = self.qk.norms[2 * first : 2 * last] if self.qk is not None else None
                hidden = self.compiled(*step[:8], cache.keys[first:last], cache.values[first:last], norms, qk,
                                       tuple(self.local_rope[first:last]))
                step = step._replace(hidden=hidden.clone(memory_format=torch.contiguous_format))  # inductor may pad rows apart
        return step.hidden

    def _visible(self, positions: torch.Tensor, span: int, rowwise: bool) -> torch.Tensor | None:
        """What keeps each row's attention to its own positions: nothing row by row (each row attends
        over its own slice), the rows' lengths for the kernel, else a (B, 1, 1, span) additive mask over
        the whole cache capacity, -inf past each row's position (nobody's yet, or a finished request's)."""
        if rowwise:
            return None
        if self.attention_kernel is not None:
            return positions + 1
        return self._mask(positions, span, None)

    @staticmethod
    def _mask(positions: torch.Tensor, span: int, window: int | None) -> torch.Tensor:
        """(B, 1, 1, span) additive: 0 where each row's new token may look (causal, within `window`), else -inf."""
        hidden = ~_window_mask(positions, span, window)
        return torch.zeros(positions.shape[0], 1, 1, span, device=positions.device).masked_fill_(hidden[:, None, None], float("-inf"))

    def _decode_chunk(self, hidden: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, visible: torch.Tensor,
                      positions: torch.Tensor, row_index: torch.Tensor, local_cos: torch.Tensor | None,
                      local_sin_signed: torch.Tensor | None, keys: list[torch.Tensor], values: list[torch.Tensor],
                      norms: list[torch.Tensor | None], qk: list[torch.Tensor] | None, local: tuple[bool, ...]) -> torch.Tensor:
        """Decode through consecutive layers (their caches, their four norm slots' weights, q / k norm weights
        and whether each reads the sliding layers' rotary table given), the first at group 0: what
        `torch.compile` compiles, so it reads no layer's module and no Python number of a tensor. Only
        uniform models are compiled: every layer has four groups (q/k/v, o, gate/up, down), and layer j of
        the chunk stands in for any layer in the per-layer lists (one activation, no sinks)."""
        step = DecodeStep(hidden, cos, sin_signed, visible, positions, row_index, local_cos, local_sin_signed)
        for j in range(len(keys)):
            hidden = self._decode_layer(j, 4 * j, step, keys[j], values[j], self.graph_projections, norms=norms[4 * j : 4 * j + 4],
                                        local=local[j], qk=qk[2 * j : 2 * j + 2] if qk is not None else None)
            step = step._replace(hidden=hidden)
        return hidden

    def _decode_layer(self, index: int, group: int, step: DecodeStep, keys: torch.Tensor, values: torch.Tensor,
                      project: Project, position: int | None = None, rowwise: bool = False,
                      norms: Sequence[torch.Tensor | nn.Module | None] | None = None, local: bool | None = None,
                      qk: Sequence[torch.Tensor | nn.Module] | None = None) -> torch.Tensor:
        """One layer of a decode step: the layer `index` of the model (or of a compiled chunk, its norms,
        rotary kind and q / k norms given), its projections group `group` on. `position`: the one row's, to
        write its cache by slice."""
        hidden, positions = step.hidden, step.positions
        rows, span = hidden.shape[0], keys.shape[2]
        if norms is None:
            norms = self._layer_norms(index)
        local = self.local_rope[index] if local is None else local
        cos, sin_signed = (step.local_cos, step.local_sin_signed) if local else (step.cos, step.sin_signed)
        q, k, v = self._attention_inputs(index, group, hidden, cos, sin_signed, norms[0], project, qk)  # q (B, H, 1, D), k/v (B, KVH, 1, D)
        if position is not None:  # one row: a slice copy costs a third of the indexed write
            keys[0, :, position], values[0, :, position] = k[0, :, 0], v[0, :, 0]
        else:
            keys[step.row_index, :, positions] = k[:, :, 0]
            values[step.row_index, :, positions] = v[:, :, 0]
        window = self.layout.windows[index]
        windowed = window is not None and step.visible_window is not None
        if rowwise:
            starts = [max(0, int(p) - window + 1) if window is not None else 0 for p in positions.tolist()]
            out = torch.cat([self._attend(index, q[b : b + 1], keys[b : b + 1, :, starts[b] : int(positions[b]) + 1],
                                          values[b : b + 1, :, starts[b] : int(positions[b]) + 1], None) for b in range(rows)])
        elif self.attention_kernel is not None and not windowed:  # `visible`: the rows' lengths
            out = self.attention_kernel(q.reshape(rows, self.kv_heads, -1, self.head_dim), keys, values, step.visible, self.scale)
        else:
            bias = step.visible_window if windowed else step.visible
            out = self._attend(index, q, keys[:rows, :, :span], values[:rows, :, :span], bias)
        return self._finish_layer(index, group, hidden, out.view(rows, 1, -1), norms, project)

    def _refresh_norms(self) -> None:
        self.norm.refresh()
        if self.qk is not None:
            self.qk.refresh()

    def _layer_norms(self, index: int) -> Sequence[torch.Tensor | nn.Module | None]:
        """Layer `index`'s norms: (pre-attention, post-attention, pre-MLP, post-MLP), None where it has none."""
        return self.norm.norms[4 * index : 4 * index + 4]

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, dict[bool, tuple[torch.Tensor, torch.Tensor]]]:
        """Token embeddings (B, T, C) and the rotary tables (B, T, 1, D) for these positions: under False
        the table of global layers (every layer's, for most families), under True the sliding layers'."""
        hidden = self.inner.embed_tokens(input_ids)
        if self.layout.embedding_multiplier != 1.0:
            hidden = hidden * self.layout.embedding_multiplier
        kinds = {False: None} if self.layout.rope_types is None else {local: SLIDING if local else "full_attention" for local in set(self.local_rope)}
        tables = {}
        for local, kind in kinds.items():
            cos, sin = self.inner.rotary_emb(hidden, positions) if kind is None else self.inner.rotary_emb(hidden, positions, kind)
            if self.layout.half_rotary:  # gpt-oss: first * cos - second * sin, second * cos + first * sin == rotate-half
                cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
            tables[local] = (cos[:, :, None], signed_sin(sin)[:, :, None])
        tables.setdefault(False, tables.get(True))  # every layer sliding (tiny test models): the one table
        return hidden, tables

    def _resolve(self, routing: Routing | None) -> StepProjections:
        """Every projection group resolved for this step's routing (re-resolved only when it changed)."""
        return StepProjections(self.projections.resolve(routing, self.inner.embed_tokens.weight.dtype), routing)

    def _attend(self, index: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One query per row against its cached keys and values, (B, KVH, span, D): (B, H, 1, D) -> (B, H, D).
        The G query heads that share a key/value head are stacked as G query rows, so K and V are read
        once, never repeated. `bias` (B, 1, 1, span): 0, or -inf where a row must not look."""
        rows, span = q.shape[0], keys.shape[2]
        groups = self.heads // self.kv_heads
        q = q.reshape(rows * self.kv_heads, groups, self.head_dim)  # (B*KVH, G, D)
        # Views of the cache, never copies: bmm takes the slot stride as its batch stride and K^T as a view.
        keys = keys.reshape(rows * self.kv_heads, span, self.head_dim)
        values = values.reshape(rows * self.kv_heads, span, self.head_dim)
        dtype = values.dtype
        if rows == 1 and span <= SMALL_ATTENTION:  # fp32 copies and MKL's sgemm beat oneDNN's fixed bf16 cost here
            q, keys, values = q.float(), keys.float(), values.float()
        scores = torch.bmm(q, keys.transpose(1, 2)).float().view(rows, self.kv_heads, groups, span).mul_(self.scale)
        scores = _softcap(scores, self.layout.attention_softcap)
        if bias is not None:
            scores.add_(bias)
        probs = self._softmax(index, scores.view(rows, self.heads, span)).to(values.dtype)
        return torch.bmm(probs.view(rows * self.kv_heads, groups, span), values).to(dtype).reshape(rows, self.heads, self.head_dim)  # (B, H, D)

    def _attention_inputs(self, index: int, group: int, hidden: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                          norm: torch.Tensor | nn.Module | None, project: Project,
                          qk_norms: Sequence[torch.Tensor | nn.Module] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden (B, T, C) -> normed, projected by `group` (q/k/v) and rotated: q (B, H, T, D), k and v (B, KVH, T, D).
        `qk_norms`: the layer's q / k norms (default: layer `index`'s)."""
        rows, steps, _ = hidden.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qkv = project(group, self.norm(norm, hidden))
        if qk_norms is None and self.qk is not None:
            qk_norms = self.qk.norms[2 * index : 2 * index + 2]
        if qk_norms is not None and self.layout.qk_norm == "projection":  # OLMo2: over q and k whole, before the heads
            qk = torch.cat((self.qk(qk_norms[0], qkv[..., : heads * dim]),
                            self.qk(qk_norms[1], qkv[..., heads * dim : (heads + kv_heads) * dim])), dim=-1)
            qk = qk.view(rows, steps, heads + kv_heads, dim)
        else:
            qk = qkv[..., : (heads + kv_heads) * dim].view(rows, steps, heads + kv_heads, dim)
        v = qkv[..., (heads + kv_heads) * dim :].view(rows, steps, kv_heads, dim)
        if qk_norms is not None and self.layout.qk_norm == "head":  # Qwen3 / Gemma 3: per head, before rotary
            qk = torch.cat((self.qk(qk_norms[0], qk[:, :, :heads]), self.qk(qk_norms[1], qk[:, :, heads:])), dim=2)
        qk = rotate(qk, cos, sin_signed).to(qkv.dtype)  # q and k heads together (OLMo2's tables are fp32: rotated in fp32, rounded after)
        return qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2), v.transpose(1, 2)

    def _finish_layer(self, index: int, group: int, hidden: torch.Tensor, attended: torch.Tensor,
                      norms: Sequence[torch.Tensor | nn.Module | None], project: Project) -> torch.Tensor:
        """hidden + o(attended), then the MLP's residual, each output normed where the family norms it
        and scaled by its residual multiplier: the layer's output (B, T, C)."""
        multiplier = self.layout.residual_multiplier
        out = self.norm(norms[1], project(group + 1, attended))
        hidden = hidden + (out if multiplier == 1.0 else out * multiplier)
        normed = self.norm(norms[2], hidden)
        if not self.gated[index]:  # transformers' module: its LoraLinear layers read the routing from LoraModel's door
            with routed(project.routing):
                out = self.mlps[index](normed)
            out = out[0] if self.layout.mlp_returns_tuple else out
        else:
            gate, up = project(group + 2, normed).chunk(2, dim=-1)
            out = project(group + 3, self.activations[index](gate) * up)
        out = self.norm(norms[3], out)
        return hidden + (out if multiplier == 1.0 else out * multiplier)

    def _logits(self, hidden: torch.Tensor, project: StepProjections) -> torch.Tensor:
        """Final norm and output head, then the family's logit scaling and cap: (B, C) -> (B, V) in the model's dtype."""
        logits = project(len(self.widths) - 1, self.norm(self.norm.norms[-1], hidden))
        if self.layout.logit_divisor != 1.0:
            logits = logits / self.layout.logit_divisor
        return _softcap(logits, self.layout.final_softcap)
