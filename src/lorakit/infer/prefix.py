"""Prefix caching: the keys and values of prompt blocks already computed, reused by later prompts.

Requests often share a beginning (a chat template's system prompt, a few-shot preamble); their keys
and values at those positions are the same whenever the tokens and the adapter mix are, because
attention is causal. Full blocks of BLOCK prompt tokens are kept after each prefill, keyed by a chain
of hashes (as vLLM's prefix caching does): block i's key hashes block i-1's key with block i's tokens,
and the first block's starts from the row's adapter mix and the adapters' versions (a reloaded or
retrained adapter never matches an old block). So a key stands for the whole prefix up to its block's
end, and a prompt's keys cost one pass over its tokens (keying every block by the prefix's tokens
themselves was quadratic in the prompt's length). The hash is BLAKE2b's 128 bits: a collision, which
would hand a prompt another's keys, is not a practical concern. A new prompt copies its longest run of
cached blocks into its slot and prefills only the rest. Bounded by bytes, least recently used evicted
first.

Off in the batch-invariant mode: a prefix's cached keys were computed in another prompt's prefill, so
a request's tokens would depend on what ran before it."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from lorakit.infer.cache import SlotCache

BLOCK = 8  # prompt tokens per cached block: prefill is compute-bound here, so fine blocks pay (16 recomputed 10 of a 42-token chat prompt, 8 recomputes 2: a 16-row prefill 95 -> 41 ms)


@dataclass
class _Block:
    keys: torch.Tensor  # (layers, KVH, BLOCK, D)
    values: torch.Tensor  # (layers, KVH, BLOCK, D)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class PrefixCache:
    """Cached prompt blocks of one engine, at most `max_bytes` of them."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0  # prompt tokens served from the cache, since the start
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Drop every cached block (a benchmark repeating a load starts it from an empty cache)."""
        self._blocks.clear()
        self.nbytes = 0

    def cached_length(self, prompt: Sequence[int], keys: Sequence[bytes]) -> int:
        """How many leading tokens of `prompt` (its block keys: block_keys) are cached (whole blocks;
        always at least one token short of the prompt, whose logits the prefill must compute)."""
        length = 0
        while length + BLOCK < len(prompt) and keys[length // BLOCK] in self._blocks:
            length += BLOCK
        return length

    @torch.inference_mode()
    def restore(self, cache: SlotCache, slot: int, keys: Sequence[bytes], length: int) -> None:
        """Copy the first `length` cached tokens of a prompt (its block keys; see cached_length) into `slot`."""
        cache.fit(length)
        for end in range(BLOCK, length + 1, BLOCK):
            key = keys[end // BLOCK - 1]
            block = self._blocks[key]
            self._blocks.move_to_end(key)
            for layer, (cached_keys, cached_values) in enumerate(zip(cache.keys, cache.values)):
                cached_keys[slot, :, end - BLOCK : end] = block.keys[layer]
                cached_values[slot, :, end - BLOCK : end] = block.values[layer]
        self.hits += length

    @torch.inference_mode()
    def store(self, cache: SlotCache, slot: int, keys: Sequence[bytes], start: int) -> None:
        """Keep a prompt's full blocks (its block keys) from position `start` on, just prefilled into `slot`."""
        for end in range(start + BLOCK, len(keys) * BLOCK + 1, BLOCK):
            key = keys[end // BLOCK - 1]
            if key in self._blocks:
                continue
            block = _Block(torch.stack([k[slot, :, end - BLOCK : end] for k in cache.keys]),
                           torch.stack([v[slot, :, end - BLOCK : end] for v in cache.values]))
            if block.nbytes > self.max_bytes:
                return
            self._blocks[key] = block
            self.nbytes += block.nbytes
            while self.nbytes > self.max_bytes:
                self.nbytes -= self._blocks.popitem(last=False)[1].nbytes


def block_keys(prompt: Sequence[int], mix: Hashable) -> list[bytes]:
    """The chained keys of `prompt`'s full blocks: key i stands for tokens 0..(i+1)*BLOCK under `mix`
    (anything hashable by its repr: the adapter mix and the adapters' versions)."""
    key = hashlib.blake2b(repr(mix).encode(), digest_size=16).digest()
    keys = []
    tokens = array("q", prompt)
    for end in range(BLOCK, len(prompt) + 1, BLOCK):
        key = hashlib.blake2b(key + tokens[end - BLOCK : end].tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys
