"""Key/value cache for incremental decoding.

Decoder self-attention keys/values grow by one step at a time; cross-attention keys/values are
computed from the encoder output once and reused by every later step.

With ``max_length`` the self-attention buffers are preallocated once, (B, H, max_length, D) per
layer, and each step writes in place: no reallocation or concatenation in the decoding loop. The
decoder's relative position bias is then also built once, as an (1, H, max_length, max_length)
table per bias-owning layer, and each step takes a slice of it instead of rebuilding the bias.
Without ``max_length``, steps are concatenated (the reference's dynamic cache behaviour).

``static=True`` (``generate(cache_implementation="static")``) goes one step further, for
``torch.compile``: nothing in a step depends on a Python number that changes between steps. The
write position is a tensor (``position``); every step attends over all ``max_length`` cached
positions, the ones not yet written masked out (their zero-initialised keys add exact zeros to the
softmax, so values equal the growing cache's); the position bias is gathered from the table by
that tensor. One captured graph then serves every step of a generation.

On the CPU, buffers that live for a whole generation (the preallocated self-attention buffers and
the cross-attention keys/values) are mapped outside the C heap when they are large
(:data:`OFF_HEAP_BYTES`, :func:`off_heap_zeros`). Under glibc they would otherwise be carved out of
the heap between the encoder's short-lived activations, which fragments it: a steady stream of
t5-base generations at 16 rows kept about 100 MB more resident than they ever used at once.
Mapped, they go back to the kernel when the generation ends.
"""

from __future__ import annotations

import math
import mmap

import torch

__all__ = ["OFF_HEAP_BYTES", "EncoderDecoderCache", "off_heap_zeros"]

# CPU cache buffers at least this large are memory-mapped (off_heap_zeros); smaller ones come from
# the allocator as usual (mapping and page-faulting in a buffer costs microseconds per page).
OFF_HEAP_BYTES: int = 1 << 20


def off_heap_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor of ``shape``; on the CPU, if at least :data:`OFF_HEAP_BYTES`, in its own
    anonymous memory map instead of the C heap (see the module docstring)."""
    mapped = _mapped(shape, dtype, device)
    return torch.zeros(shape, dtype=dtype, device=device) if mapped is None else mapped


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Zeros of ``shape`` in a new anonymous memory map, or None where off_heap_zeros would not map.
    The kernel supplies zeroed pages as they are first touched (nothing is written here); the map
    goes back to the kernel when the tensor and every view of it are freed."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < max(OFF_HEAP_BYTES, 1) or torch.compiler.is_compiling():
        return None  # (a traced graph allocates its own buffers)
    region = mmap.mmap(-1, nbytes)  # the tensor keeps a reference to it
    return torch.frombuffer(region, dtype=dtype, count=numel).view(shape)


class EncoderDecoderCache:
    """Per-layer decoder caches: self-attention (growing) and cross-attention (computed once).

    Args:
        num_layers: Decoder depth.
        max_length: If given, preallocate self-attention buffers for this many positions.
        static: Keep the step position in a tensor and attend over all ``max_length`` positions
            (static shapes for ``torch.compile``); needs ``max_length``.
    """

    def __init__(self, num_layers: int, max_length: int | None = None, static: bool = False) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length}")
        if static and max_length is None:
            raise ValueError("A static cache needs max_length (the number of positions to preallocate)")
        self.static = static
        self.num_layers = num_layers
        self.max_length = max_length
        self.self_keys: list[torch.Tensor | None] = [None] * num_layers
        self.self_values: list[torch.Tensor | None] = [None] * num_layers
        self.cross_keys: list[torch.Tensor | None] = [None] * num_layers
        self.cross_values: list[torch.Tensor | None] = [None] * num_layers
        self._length = 0  # positions written and committed by `advance`
        # layer index -> (1, H, max_length, max_length) position bias, filled by the decoder stack.
        self.position_bias_tables: dict[int, torch.Tensor] = {}
        # Static caches: () long, positions written so far, on the model's device (made at the first step).
        self.position: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of decoder positions already in the cache."""
        if self.static:
            return 0 if self.position is None else int(self.position)  # a host sync: not for the step itself
        return self._length

    def query_positions(self, num_queries: int, device: torch.device) -> torch.Tensor:
        """Static caches: (T,) positions of the next ``num_queries`` queries, as a tensor."""
        if self.position is None:
            self.position = torch.zeros((), dtype=torch.long, device=device)
        return self.position + torch.arange(num_queries, device=device)

    def __len__(self) -> int:
        return self.num_layers

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's self-attention key/value (B, H, T, D); return all so far (B, H, L+T, D)."""
        if self.static:
            return self._update_static(layer_idx, key, value)
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
            buf_k = off_heap_zeros((b, h, self.max_length, d), key.dtype, key.device)
            buf_v = off_heap_zeros((b, h, self.max_length, d), value.dtype, value.device)
            self.self_keys[layer_idx], self.self_values[layer_idx] = buf_k, buf_v
        buf_k[:, :, start:end] = key
        buf_v[:, :, start:end] = value
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def _update_static(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write at the tensor position; return the whole (B, H, max_length, D) buffers."""
        assert self.max_length is not None
        buf_k, buf_v = self.self_keys[layer_idx], self.self_values[layer_idx]
        if buf_k is None or buf_v is None:
            b, h, _, d = key.shape
            # Zeros, not empty: unwritten positions still enter the scores (masked), and garbage may be NaN.
            buf_k = off_heap_zeros((b, h, self.max_length, d), key.dtype, key.device)
            buf_v = off_heap_zeros((b, h, self.max_length, d), value.dtype, value.device)
            self.self_keys[layer_idx], self.self_values[layer_idx] = buf_k, buf_v
        if layer_idx == 0 and not torch.compiler.is_compiling():  # eager: check the bounds (one host sync)
            end = self.get_seq_length() + key.shape[2]
            if end > self.max_length:
                raise ValueError(
                    f"The decoder cache was preallocated for {self.max_length} positions but position {end} "
                    "was requested; create the cache with a larger max_length"
                )
        index = self.query_positions(key.shape[2], key.device)  # (T,)
        buf_k.index_copy_(2, index, key)
        buf_v.index_copy_(2, index, value)
        return buf_k, buf_v

    def advance(self, num_positions: int) -> None:
        """Commit ``num_positions`` new positions once every layer has written them."""
        if self.static:
            assert self.position is not None
            self.position.add_(num_positions)  # in place: a compiled step mutates its input, no new guard
            return
        self._length += num_positions

    def has_cross(self, layer_idx: int) -> bool:
        return self.cross_keys[layer_idx] is not None

    def get_cross(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cross_keys[layer_idx], self.cross_values[layer_idx]
        assert k is not None and v is not None
        return k, v

    def set_cross(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.cross_keys[layer_idx], self.cross_values[layer_idx] = key, value

    @staticmethod
    def hold(x: torch.Tensor) -> torch.Tensor:
        """``x`` (keys or values of the encoder output, (B, H, S, D), cached for a whole generation)
        as a contiguous tensor: copied into a memory map of its own where :func:`off_heap_zeros`
        would map it, by ``contiguous()`` otherwise. Returned as is when it needs gradients (training
        keeps the autograd graph through the original)."""
        if x.requires_grad:
            return x
        held = _mapped(tuple(x.shape), x.dtype, x.device)
        return x.contiguous() if held is None else held.copy_(x)

    def reorder_cache(self, index: torch.Tensor, length: int | None = None) -> None:
        """Select batch rows (e.g. surviving beams) of the self-attention caches.

        Cross-attention keys/values are left alone: beams of one input share them (the attention
        layer groups a row's beams against its single copy of the encoder keys). ``length``: the
        positions written so far, if the caller knows it; a static cache (whose count is a tensor)
        then moves only those, not its whole buffer (the rest are zeros in every row). A preallocated
        cache on the CPU copies only the rows that move (see :meth:`_moved_rows`).
        """
        n = self._length
        if self.static:
            n = self.max_length if length is None else length
        moved = self._moved_rows(index) if self.max_length is not None else None  # only preallocated caches use it
        for i in range(self.num_layers):
            k, v = self.self_keys[i], self.self_values[i]
            if k is None or v is None:
                continue
            if self.max_length is not None and index.shape[0] == k.shape[0]:
                # Preallocated, same number of rows: rewrite in place only the positions written so far,
                # of only the rows that take another row's (the selection is read before it is written).
                k, v = k[:, :, :n], v[:, :, :n]
                if moved is None:
                    k.copy_(k.index_select(0, index))
                    v.copy_(v.index_select(0, index))
                elif moved.numel():
                    k.index_copy_(0, moved, k.index_select(0, index[moved]))
                    v.index_copy_(0, moved, v.index_select(0, index[moved]))
            else:
                self.self_keys[i], self.self_values[i] = k.index_select(0, index), v.index_select(0, index)

    @staticmethod
    def _moved_rows(index: torch.Tensor) -> torch.Tensor | None:
        """The rows ``i`` with ``index[i] != i``, where copying only those is the cheaper reorder: on
        the CPU (finding them reads ``index`` on the host, a synchronisation on other devices) when
        at most half the rows move; None otherwise. Most beams continue themselves (78% of the rows
        at each step of t5-small's beam4 b8 column), and a static cache moved every row's written
        positions at each step: 2.0 ms a step at 32 positions, 0.7 ms moving 7 rows of 32."""
        if index.device.type != "cpu":
            return None
        moved = (index != torch.arange(index.shape[0])).nonzero().squeeze(1)
        return moved if 2 * moved.numel() <= index.shape[0] else None
