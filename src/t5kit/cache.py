"""Key/value cache for incremental decoding.

Decoder self-attention keys/values grow by one step at a time; cross-attention keys/values are
computed from the encoder output once and reused by every later step.

With ``max_length`` the self-attention buffers are preallocated once, (B, H, max_length, D) per
layer, and each step writes in place: no reallocation or concatenation in the decoding loop. The
decoder's relative position bias is then also built once, as an (1, H, max_length, max_length)
table per bias-owning layer, and each step takes a slice of it instead of rebuilding the bias.
Without ``max_length``, steps are concatenated (the reference's dynamic cache behaviour).
"""

from __future__ import annotations

import torch

__all__ = ["EncoderDecoderCache"]


class EncoderDecoderCache:
    """Per-layer decoder caches: self-attention (growing) and cross-attention (computed once).

    Args:
        num_layers: Decoder depth.
        max_length: If given, preallocate self-attention buffers for this many positions.
    """

    def __init__(self, num_layers: int, max_length: int | None = None) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length}")
        self.num_layers = num_layers
        self.max_length = max_length
        self.self_keys: list[torch.Tensor | None] = [None] * num_layers
        self.self_values: list[torch.Tensor | None] = [None] * num_layers
        self.cross_keys: list[torch.Tensor | None] = [None] * num_layers
        self.cross_values: list[torch.Tensor | None] = [None] * num_layers
        self._length = 0  # positions written and committed by `advance`
        # layer index -> (1, H, max_length, max_length) position bias, filled by the decoder stack.
        self.position_bias_tables: dict[int, torch.Tensor] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of decoder positions already in the cache."""
        return self._length

    def __len__(self) -> int:
        return self.num_layers

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's self-attention key/value (B, H, T, D); return all so far (B, H, L+T, D)."""
        start, end = self._length, self._length + key.shape[2]
        if self.max_length is None:
            old_k, old_v = self.self_keys[layer_idx], self.self_values[layer_idx]
            if old_k is not None:
                key, value = torch.cat([old_k, key], dim=2), torch.cat([old_v, value], dim=2)
            self.self_keys[layer_idx], self.self_values[layer_idx] = key, value
            return key, value
        if end > self.max_length:
            raise ValueError(
                f"The decoder cache was preallocated for {self.max_length} positions but position {end} "
                "was requested; create the cache with a larger max_length"
            )
        buf_k, buf_v = self.self_keys[layer_idx], self.self_values[layer_idx]
        if buf_k is None:
            b, h, _, d = key.shape
            buf_k = key.new_empty(b, h, self.max_length, d)
            buf_v = value.new_empty(b, h, self.max_length, d)
            self.self_keys[layer_idx], self.self_values[layer_idx] = buf_k, buf_v
        buf_k[:, :, start:end] = key
        buf_v[:, :, start:end] = value
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, num_positions: int) -> None:
        """Commit ``num_positions`` new positions once every layer has written them."""
        self._length += num_positions

    def has_cross(self, layer_idx: int) -> bool:
        return self.cross_keys[layer_idx] is not None

    def get_cross(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cross_keys[layer_idx], self.cross_values[layer_idx]
        assert k is not None and v is not None
        return k, v

    def set_cross(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.cross_keys[layer_idx], self.cross_values[layer_idx] = key, value

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Select batch rows (e.g. surviving beams) of the self-attention caches.

        Cross-attention keys/values are left alone: beams of one input share them (the attention
        layer groups a row's beams against its single copy of the encoder keys).
        """
        n = self._length
        for i in range(self.num_layers):
            k, v = self.self_keys[i], self.self_values[i]
            if k is None or v is None:
                continue
            if self.max_length is not None and index.shape[0] == k.shape[0]:
                # Preallocated, same number of rows: rewrite in place only the positions written so far.
                k[:, :, :n] = k[:, :, :n].index_select(0, index)
                v[:, :, :n] = v[:, :, :n].index_select(0, index)
            else:
                self.self_keys[i], self.self_values[i] = k.index_select(0, index), v.index_select(0, index)
