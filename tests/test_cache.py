"""The decoder cache: preallocated and growing modes."""

from __future__ import annotations

import math
import os

import pytest
import torch

from t5kit import EncoderDecoderCache
from t5kit import cache as cache_module
from t5kit.cache import off_heap_zeros


@pytest.mark.parametrize("max_length", [None, 8])
def test_update_returns_everything_so_far(max_length) -> None:
    cache = EncoderDecoderCache(num_layers=2, max_length=max_length)
    steps = [torch.randn(2, 3, 1, 4) for _ in range(5)]
    for s in steps:
        for layer in range(2):
            k, v = cache.update(layer, s, -s)
        cache.advance(1)
    assert cache.get_seq_length() == 5
    assert torch.equal(k, torch.cat(steps, dim=2)) and torch.equal(v, -torch.cat(steps, dim=2))


def test_preallocated_buffers_are_written_in_place_and_bounded() -> None:
    cache = EncoderDecoderCache(num_layers=1, max_length=3)
    k, _ = cache.update(0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    cache.advance(2)
    buffer = cache.self_keys[0]
    cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    cache.advance(1)
    assert cache.self_keys[0] is buffer and buffer.shape == (1, 1, 3, 2)
    with pytest.raises(ValueError, match="preallocated for 3 positions"):
        cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_reorder_selects_rows() -> None:
    cache = EncoderDecoderCache(num_layers=1)
    x = torch.arange(3.0).view(3, 1, 1, 1)
    cache.update(0, x, x)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.self_keys[0].flatten().tolist() == [2.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="positive"):
        EncoderDecoderCache(1, max_length=0)


def test_static_cache_writes_at_its_position_tensor() -> None:
    cache = EncoderDecoderCache(num_layers=1, max_length=4, static=True)
    a = torch.ones(1, 1, 2, 3)
    k, v = cache.update(0, a, -a)
    cache.advance(2)
    # Every position comes back, the unwritten ones zero (masked by the decoder, finite in the scores).
    assert k.shape == (1, 1, 4, 3) and torch.equal(k[:, :, :2], a) and torch.equal(v[:, :, :2], -a)
    assert not k[:, :, 2:].any()
    assert cache.position is not None and cache.position.dim() == 0 and cache.get_seq_length() == 2
    b = torch.full((1, 1, 1, 3), 2.0)
    k, _ = cache.update(0, b, b)
    cache.advance(1)
    assert torch.equal(k[:, :, 2:3], b) and cache.self_keys[0] is k and cache.get_seq_length() == 3
    cache.update(0, b, b)
    cache.advance(1)
    with pytest.raises(ValueError, match="preallocated for 4 positions"):
        cache.update(0, b, b)
    with pytest.raises(ValueError, match="needs max_length"):
        EncoderDecoderCache(1, static=True)


def test_static_cache_reorders_every_position() -> None:
    cache = EncoderDecoderCache(num_layers=1, max_length=3, static=True)
    x = torch.arange(3.0).view(3, 1, 1, 1)
    cache.update(0, x, x)
    cache.advance(1)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.self_keys[0][:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]


def test_static_cache_reorders_the_written_length_only() -> None:
    cache = EncoderDecoderCache(num_layers=1, max_length=3, static=True)
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 1, 2)
    cache.update(0, x, x)
    cache.advance(1)
    buf = cache.self_keys[0]
    buf[:, :, 1:] = 7.0  # stands in for positions not written yet: a length-aware reorder leaves them
    cache.reorder_cache(torch.tensor([2, 2, 0]), length=1)
    assert buf[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0] and bool((buf[:, :, 1:] == 7.0).all())
    buf[:, 0, 2, 0] = torch.tensor([10.0, 11.0, 12.0])
    cache.reorder_cache(torch.tensor([2, 0, 1]))  # no length: the whole buffer moves
    assert buf[:, 0, 0, 0].tolist() == [0.0, 2.0, 2.0] and buf[:, 0, 2, 0].tolist() == [12.0, 10.0, 11.0]
    assert cache.self_keys[0] is buf


@pytest.mark.parametrize(
    "index, moves",
    [
        ([0, 1, 2, 3, 4, 5, 6, 7], []),  # nothing moves: nothing is copied
        ([0, 0, 2, 1, 4, 5, 6, 7], [1, 3]),  # row 1 is overwritten and also read (by row 3)
        ([1, 0, 2, 3, 4, 5, 7, 6], [0, 1, 6, 7]),  # swaps: sources read before they are written
        ([7, 6, 5, 4, 3, 2, 1, 0], None),  # more than half move: the whole selection
    ],
)
@pytest.mark.parametrize("static", [False, True])
def test_reorder_copies_only_the_rows_that_move(index, moves, static) -> None:
    torch.manual_seed(0)
    cache = EncoderDecoderCache(num_layers=2, max_length=5, static=static)
    for layer in range(2):
        cache.update(layer, torch.randn(8, 2, 3, 4), torch.randn(8, 2, 3, 4))
    cache.advance(3)
    keys = [k.clone() for k in cache.self_keys]
    values = [v.clone() for v in cache.self_values]
    index = torch.tensor(index)
    moved = EncoderDecoderCache._moved_rows(index)
    assert (moved is None) if moves is None else moved.tolist() == moves
    cache.reorder_cache(index, length=3)
    for layer in range(2):
        assert torch.equal(cache.self_keys[layer][:, :, :3], keys[layer][index, :, :3])
        assert torch.equal(cache.self_values[layer][:, :, :3], values[layer][index, :, :3])
        assert torch.equal(cache.self_keys[layer][:, :, 3:], keys[layer][:, :, 3:])  # unwritten: untouched


# ------------------------------------------------------------------------------------------------
# Buffers that live for a generation, mapped outside the heap (OFF_HEAP_BYTES).


def _mapping_at(address: int) -> str | None:
    """The /proc/self/maps line of the mapping that starts at ``address``, if any."""
    for line in open("/proc/self/maps"):
        if int(line.split("-", 1)[0], 16) == address:
            return line
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_large_cpu_buffers_get_their_own_mapping_and_give_it_back() -> None:
    shape = (2, 4, 64, 1024)  # 2 MB of float32: over OFF_HEAP_BYTES
    assert math.prod(shape) * 4 >= cache_module.OFF_HEAP_BYTES
    z = off_heap_zeros(shape, torch.float32, torch.device("cpu"))
    assert z.shape == shape and z.is_contiguous() and not z.any()
    address = z.data_ptr()
    assert _mapping_at(address) is not None  # a mapping of its own, not a block of the heap
    z[1, 2, 3] = 5.0  # writable
    assert z.sum() == 5.0 * 1024
    view = z[0]
    del z
    assert _mapping_at(address) is not None  # a view keeps it
    del view
    assert _mapping_at(address) is None  # unmapped once the last view goes


def test_small_and_non_cpu_buffers_are_ordinary_zeros(monkeypatch) -> None:
    small = off_heap_zeros((2, 3), torch.bfloat16, torch.device("cpu"))
    assert small.dtype == torch.bfloat16 and not small.any()
    monkeypatch.setattr(cache_module, "OFF_HEAP_BYTES", 0)
    meta = off_heap_zeros((2, 3), torch.float32, torch.device("meta"))
    assert meta.device.type == "meta"


def test_hold_stores_cached_keys_contiguous_and_large_ones_out_of_the_heap(monkeypatch) -> None:
    x = torch.randn(3, 5, 8)
    assert EncoderDecoderCache.hold(x) is x  # small and contiguous: as is
    strided = torch.randn(3, 8, 5).transpose(1, 2)
    held = EncoderDecoderCache.hold(strided)
    assert held.is_contiguous() and torch.equal(held, strided)
    monkeypatch.setattr(cache_module, "OFF_HEAP_BYTES", 1)
    for t in (x, strided):
        held = EncoderDecoderCache.hold(t)
        assert torch.equal(held, t) and held.is_contiguous() and held.data_ptr() != t.data_ptr()
    trained = strided.clone().requires_grad_()
    assert EncoderDecoderCache.hold(trained) is trained  # keeps its autograd graph
