"""The decoder cache: preallocated and growing modes."""

from __future__ import annotations

import pytest
import torch

from t5kit import EncoderDecoderCache


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
