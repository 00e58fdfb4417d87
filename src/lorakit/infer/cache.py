"""The KV cache of the generation engine: one slot per running sequence, every layer's keys and values."""

from __future__ import annotations

from dataclasses import dataclass

import torch


CAPACITY_STEP = 64  # cache positions are added or released in blocks of this many


@dataclass
class SlotCache:
    """Keys and values of `slots` sequences, per layer, each (slots, KVH, C, D), where C, the capacity,
    follows the longest running sequence in blocks of 64 positions, up to `limit`.

    Decode attends over all C positions (masking those past each row's own), so the rows' blocks are
    contiguous and the batched matmuls read the cache in place (a slice of a larger cache made them
    copy it first: ~40% of a 16-row decode step on the default model). Keys are kept untransposed:
    decode's q K^T reads them through a transposed view, which measured faster at 16 rows than keys
    stored transposed. Resizing copies the cache once per 64 positions of growth."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    limit: int

    @classmethod
    def allocate(cls, layers: int, slots: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> SlotCache:
        """A cache for `slots` sequences of up to `length` positions (the capacity starts at one block)."""
        empty = torch.empty(slots, kv_heads, 0, head_dim, dtype=dtype, device=device)
        cache = cls([empty] * layers, [empty] * layers, length)
        cache.fit(1)
        return cache

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

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
        slots, kv_heads, _, head_dim = self.keys[0].shape
        old = self.keys + self.values
        buffer = self.keys[0].new_zeros(len(old), slots, kv_heads, capacity, head_dim)
        keep = min(capacity, self.capacity)
        for new, tensor in zip(buffer, old):
            new[:, :, :keep] = tensor[:, :, :keep]
        layers = len(self.keys)
        self.keys, self.values = list(buffer[:layers]), list(buffer[layers:])

    @torch.inference_mode()  # the cache's tensors are made in inference mode (fit runs inside decode)
    def move(self, source: int, target: int, tokens: int) -> None:
        """Copy slot `source`'s first `tokens` positions into slot `target` (compacting the running rows)."""
        for layer in self.keys + self.values:
            layer[target, :, :tokens] = layer[source, :, :tokens]
