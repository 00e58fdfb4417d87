"""A lean forward pass of a Llama-style decoder over a slot KV cache, for generation.

transformers' modules hold the weights and do the small per-token work (embeddings, norms, rotary
tables); the projections run as fused, prepacked matmuls (infer/packed.py: q/k/v as one, gate/up as
one) with each LoraLinear adding its rows' adapters; attention and the cache are lorakit's. Rows of a
batch are cache slots 0..B-1, so the cache is read as a view, never gathered: the engine keeps its
running requests in the lowest slots.

Shapes: B rows, T new tokens per row, H query heads, KVH key/value heads (G = H / KVH share one),
D head size, L tokens cached per slot at most."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from lorakit.errors import LorakitError
from lorakit.infer.packed import FusedLinear


CAPACITY_STEP = 64  # cache positions are added or released in blocks of this many


@dataclass
class SlotCache:
    """Keys and values of `slots` sequences, per layer: keys transposed, (slots, KVH, D, C), values
    (slots, KVH, C, D), where C, the capacity, follows the longest running sequence in blocks of 64
    positions, up to `limit`.

    Decode attends over all C positions (masking those past each row's own), so the rows' blocks are
    contiguous and the batched matmuls read the cache in place: a slice of a larger cache made them
    copy it first, and keys stored untransposed made q K^T copy too (together ~40% of a 16-row decode
    step on the default model). Resizing copies the cache once per 64 positions of growth."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    limit: int

    @classmethod
    def allocate(cls, layers: int, slots: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> SlotCache:
        """A cache for `slots` sequences of up to `length` positions (the capacity starts at one block)."""
        cache = cls([torch.empty(slots, kv_heads, head_dim, 0, dtype=dtype, device=device)] * layers,
                    [torch.empty(slots, kv_heads, 0, head_dim, dtype=dtype, device=device)] * layers, length)
        cache.fit(1)
        return cache

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.values[0].shape[2]

    @torch.inference_mode()
    def fit(self, length: int, shrink: bool = False) -> None:
        """Make room for `length` positions; with `shrink`, also release blocks when `length` needs at
        most half of the capacity (a long request finished: the short ones must not attend over its room)."""
        wanted = min(self.limit, -(-length // CAPACITY_STEP) * CAPACITY_STEP)
        if wanted > self.capacity or (shrink and wanted <= self.capacity // 2):
            self._resize(wanted)

    def _resize(self, capacity: int) -> None:
        """Every layer's keys and values in one new zeroed buffer (one allocation: large enough for the
        allocator to map it afresh and unmap the old one, so resizing does not fragment the heap)."""
        slots, kv_heads, head_dim = self.keys[0].shape[:3]
        block = slots * kv_heads * head_dim * capacity
        buffer = self.keys[0].new_zeros(2 * len(self.keys) * block)
        keep = min(capacity, self.capacity)
        for i in range(len(self.keys)):
            keys = buffer[2 * i * block : (2 * i + 1) * block].view(slots, kv_heads, head_dim, capacity)
            values = buffer[(2 * i + 1) * block : (2 * i + 2) * block].view(slots, kv_heads, capacity, head_dim)
            keys[..., :keep] = self.keys[i][..., :keep]
            values[:, :, :keep] = self.values[i][:, :, :keep]
            self.keys[i], self.values[i] = keys, values

    @torch.inference_mode()  # the cache's tensors are made in inference mode (fit runs inside decode)
    def move(self, source: int, target: int, tokens: int) -> None:
        """Copy slot `source`'s first `tokens` positions into slot `target` (compacting the running rows)."""
        for layer in self.keys:
            layer[target, :, :, :tokens] = layer[source, :, :, :tokens]
        for layer in self.values:
            layer[target, :, :tokens] = layer[source, :, :tokens]


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary embedding (rotate-half form) on (B, heads, T, D), with cos / sin (B, T, D) from the
    model's own rotary module. Written out here so the engine does not import transformers' modelling code."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decoder_parts(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model` of a LlamaForCausalLM), checked to have the Llama layout."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "rotary_emb") or not hasattr(layers[0], "self_attn"):
        raise LorakitError(
            f"the generation engine runs Llama-style decoders (Llama, Mistral, Qwen2, SmolLM); {type(model).__name__} "
            "is not one: use transformers' generate for it"
        )
    return inner


def _head_name(model: nn.Module) -> str:
    """The attribute that holds the output projection (`lm_head` for every Llama-style model)."""
    head = model.get_output_embeddings()
    return next(name for name, child in model.named_children() if child is head)


class SlotDecoder:
    """Prefill and decode steps of one Llama-style causal LM over a SlotCache."""

    def __init__(self, model: nn.Module, pack: bool = True) -> None:
        """`pack=False` runs every projection as its own module (for comparison; packing is used only
        where it applies, see infer/packed.py)."""
        self.model = model
        self.inner = decoder_parts(model)
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.head = FusedLinear(model, [_head_name(model)], pack)
        self.scale = self.head_dim**-0.5
        attention = [layer.self_attn for layer in self.inner.layers]
        self.qkv = [FusedLinear(a, ["q_proj", "k_proj", "v_proj"], pack) for a in attention]
        self.o_proj = [FusedLinear(a, ["o_proj"], pack) for a in attention]
        self.mlp = [_FusedMLP.of(layer.mlp, pack) for layer in self.inner.layers]

    def allocate(self, slots: int, length: int) -> SlotCache:
        weight = self.inner.embed_tokens.weight
        return SlotCache.allocate(len(self.inner.layers), slots, self.kv_heads, length, self.head_dim, weight.dtype, weight.device)

    @torch.inference_mode()
    def prefill(self, cache: SlotCache, first_slot: int, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts (B, T) from position 0 into slots first_slot.. first_slot+B-1;
        returns the logits after each prompt's last real token, (B, V) in the model's dtype.

        Padding sits after each prompt, so causal attention never lets a real token see it; its cache
        entries are overwritten by the first decoded tokens."""
        rows, steps = input_ids.shape
        cache.fit(steps)
        positions = torch.arange(steps, device=input_ids.device).expand(rows, steps)
        hidden = self.inner.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.inner.rotary_emb(hidden, positions)
        slots = slice(first_slot, first_slot + rows)
        for index, layer in enumerate(self.inner.layers):
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            q, k, v = self._qkv(index, hidden, cos, sin)  # (B, H|KVH, T, D)
            cache.keys[index][slots, :, :, :steps] = k.transpose(2, 3)
            cache.values[index][slots, :, :steps] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
            hidden = residual + self.o_proj[index](out.transpose(1, 2).reshape(rows, steps, -1))[0]
            hidden = hidden + self.mlp[index](layer.post_attention_layernorm(hidden))
        last = hidden[torch.arange(rows), lengths - 1]  # (B, C)
        return self.head(self.inner.norm(last))[0]

    @torch.inference_mode()
    def decode(self, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor, rowwise: bool = False) -> torch.Tensor:
        """One new token for each of the rows in slots 0..B-1, at `positions` (B,); returns (B, V) logits
        in the model's dtype (greedy argmax needs no fp32 copy: the values are the same).

        `rowwise` attends row by row over exactly each row's own tokens, so a row's result does not
        depend on the other rows' lengths (the batch-invariant mode)."""
        rows = tokens.shape[0]
        cache.fit(int(positions.max()) + 1, shrink=True)
        span = cache.capacity  # every row attends over the whole capacity, its own future masked
        hidden = self.inner.embed_tokens(tokens[:, None])  # (B, 1, C)
        cos, sin = self.inner.rotary_emb(hidden, positions[:, None])
        row_index = torch.arange(rows, device=tokens.device)
        # Keys past a row's own position belong to nobody yet (or to a finished request): masked out.
        masked = torch.arange(span, device=tokens.device)[None, :] > positions[:, None]  # (B, span)
        masked = masked[:, None, None, :]  # (B, 1, 1, span)
        for index, layer in enumerate(self.inner.layers):
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            q, k, v = self._qkv(index, hidden, cos, sin)  # q (B, H, 1, D), k/v (B, KVH, 1, D)
            keys, values = cache.keys[index], cache.values[index]
            keys[row_index, :, :, positions] = k[:, :, 0]
            values[row_index, :, positions] = v[:, :, 0]
            if rowwise:
                out = torch.cat([self._attend(q[b : b + 1], keys[b : b + 1, :, :, : int(positions[b]) + 1],
                                              values[b : b + 1, :, : int(positions[b]) + 1], None) for b in range(rows)])
            else:
                out = self._attend(q, keys[:rows, :, :, :span], values[:rows, :, :span], masked)
            hidden = residual + self.o_proj[index](out.reshape(rows, 1, -1))[0]
            hidden = hidden + self.mlp[index](layer.post_attention_layernorm(hidden))
        return self.head(self.inner.norm(hidden[:, 0]))[0]

    def _qkv(self, index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        rows, steps, _ = hidden.shape
        q, k, v = (t.view(rows, steps, -1, self.head_dim) for t in self.qkv[index](hidden))
        attn = self.inner.layers[index].self_attn
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        return q, k, v

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
        """One query per row against its cached keys, (B, KVH, D, span) transposed: (B, H, 1, D) -> (B, H, D).
        The G query heads that share a key/value head are stacked as G query rows, so K and V are read
        once, never repeated."""
        rows, span = q.shape[0], keys.shape[3]
        groups = self.heads // self.kv_heads
        q = q.reshape(rows * self.kv_heads, groups, self.head_dim)  # (B*KVH, G, D)
        # Views of the cache, never copies: bmm takes the slot stride as its batch stride.
        keys = keys.reshape(rows * self.kv_heads, self.head_dim, span)
        values = values.reshape(rows * self.kv_heads, span, self.head_dim)
        scores = torch.bmm(q, keys).float() * self.scale  # (B*KVH, G, span)
        if masked is not None:
            scores = scores.view(rows, self.kv_heads, groups, span).masked_fill_(masked, float("-inf")).view_as(scores)
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.bmm(probs, values).reshape(rows, self.heads, self.head_dim)  # (B, H, D)


class _FusedMLP:
    """A gated MLP (Llama's down(act(gate(x)) * up(x))) with gate and up as one fused matmul; any other
    MLP runs as its module."""

    def __init__(self, mlp: nn.Module, pack: bool) -> None:
        self.mlp = mlp
        self.gate_up = FusedLinear(mlp, ["gate_proj", "up_proj"], pack)
        self.down = FusedLinear(mlp, ["down_proj"], pack)

    @classmethod
    def of(cls, mlp: nn.Module, pack: bool) -> _FusedMLP | nn.Module:
        gated = all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        return cls(mlp, pack) if gated else mlp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down(self.mlp.act_fn(gate) * up)[0]
