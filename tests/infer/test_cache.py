"""SlotCache: allocation shapes, capacity in 64-position blocks up to the limit, content kept on growth and
shrink, and move copying one slot's first positions into another."""

from __future__ import annotations

import pytest
import torch

from lorakit.infer.cache import CAPACITY_STEP, SlotCache

LAYERS, SLOTS, KVH, HEAD_DIM = 3, 4, 2, 8


def make(limit: int = 512, dtype=torch.float32) -> SlotCache:
    return SlotCache.allocate(LAYERS, SLOTS, KVH, limit, HEAD_DIM, dtype, torch.device("cpu"))


def fill(cache: SlotCache, seed: int = 0) -> None:
    """Distinct random content in every layer's keys and values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for tensor in cache.keys + cache.values:
            tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))


def snapshot(cache: SlotCache) -> list[torch.Tensor]:
    return [t.clone() for t in cache.keys + cache.values]


def test_allocate_shapes_start_at_one_block():
    cache = make(limit=512)
    assert len(cache.keys) == len(cache.values) == LAYERS
    for tensor in cache.keys + cache.values:
        assert tensor.shape == (SLOTS, KVH, CAPACITY_STEP, HEAD_DIM)
        assert tensor.dtype == torch.float32
    assert cache.slots == SLOTS
    assert cache.capacity == CAPACITY_STEP == 64
    assert cache.limit == 512


def test_allocate_keeps_the_dtype():
    cache = make(dtype=torch.bfloat16)
    assert {t.dtype for t in cache.keys + cache.values} == {torch.bfloat16}


def test_a_limit_under_one_block_caps_the_capacity():
    assert make(limit=10).capacity == 10


def test_layers_keys_and_values_are_separate_storage():
    cache = make()
    with torch.inference_mode():
        cache.keys[0].fill_(1.0)
    assert all(bool((t == 0).all()) for t in cache.keys[1:] + cache.values)


@pytest.mark.parametrize("length, capacity", [(1, 64), (64, 64), (65, 128), (128, 128), (129, 192), (300, 320)])
def test_fit_grows_in_blocks_of_64(length, capacity):
    cache = make(limit=512)
    cache.fit(length)
    assert cache.capacity == capacity == -(-length // 64) * 64
    assert all(t.shape == (SLOTS, KVH, capacity, HEAD_DIM) for t in cache.keys + cache.values)


def test_fit_never_exceeds_the_limit():
    cache = make(limit=300)
    cache.fit(290)  # 5 blocks would be 320
    assert cache.capacity == 300
    cache.fit(10_000)
    assert cache.capacity == 300


def test_fit_within_capacity_does_not_reallocate():
    cache = make()
    cache.fit(100)
    pointers = [t.data_ptr() for t in cache.keys + cache.values]
    cache.fit(128)
    cache.fit(3)  # smaller, without shrink: nothing released
    assert cache.capacity == 128
    assert [t.data_ptr() for t in cache.keys + cache.values] == pointers


def test_growth_keeps_content_and_zeroes_the_new_room():
    cache = make()
    fill(cache, seed=1)
    before = snapshot(cache)
    cache.fit(130)
    assert cache.capacity == 192
    for old, new in zip(before, cache.keys + cache.values):
        assert torch.equal(new[:, :, :64], old)
        assert bool((new[:, :, 64:] == 0).all())


def test_shrink_releases_blocks_once_half_is_enough_and_keeps_the_front():
    cache = make()
    cache.fit(256)
    fill(cache, seed=2)
    before = snapshot(cache)
    cache.fit(129, shrink=True)  # 192 > 256 // 2: kept
    assert cache.capacity == 256
    cache.fit(128, shrink=True)  # 128 <= 128: released
    assert cache.capacity == 128
    for old, new in zip(before, cache.keys + cache.values):
        assert torch.equal(new, old[:, :, :128])
    cache.fit(5, shrink=True)
    assert cache.capacity == 64
    for old, new in zip(before, cache.keys + cache.values):
        assert torch.equal(new, old[:, :, :64])


def test_shrink_never_goes_under_what_is_asked():
    cache = make()
    cache.fit(200)
    cache.fit(150, shrink=True)  # needs 192 of 256: more than half
    assert cache.capacity == 256


def test_move_copies_the_first_positions_of_a_slot():
    cache = make()
    cache.fit(100)
    fill(cache, seed=3)
    before = snapshot(cache)
    cache.move(source=3, target=1, tokens=37)
    for old, new in zip(before, cache.keys + cache.values):
        assert torch.equal(new[1, :, :37], old[3, :, :37])  # copied
        assert torch.equal(new[1, :, 37:], old[1, :, 37:])  # the rest of the target untouched
        for slot in (0, 2, 3):
            assert torch.equal(new[slot], old[slot])  # source and other slots unchanged
