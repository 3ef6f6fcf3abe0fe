"""Preallocated key/value cache for a batch of sequences.

Layout: one tensor for keys and one for values, each ``(num_layers, batch, num_kv_heads, max_len, head_dim)``
in the model's dtype. Slots are shared by the batch: a chunk of ``T`` tokens fed at slot ``start`` is
written to slots ``[start, start + T)`` of every sequence, and prompts of different lengths are
left-padded so that they end on the same slot (``key_valid`` marks the padding as invisible).
Allocating once, for the batch and the longest sequence, keeps decode free of reallocations and gives
the fixed addresses that CUDA-graph capture needs later.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.model.config import ModelConfig


class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``max_len`` tokens."""

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        max_len: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if batch < 1 or max_len < 1:
            raise LowbitError(f"a KV cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.batch = batch
        self.max_len = max_len

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (batch, kv_heads, T, head_dim) at slots ``[start, start+T)`` of ``layer``.

        Returns the keys and values of slots ``[0, start+T)``: views, not copies.
        """
        end = start + k.shape[2]
        if end > self.max_len:
            raise LowbitError(f"KV cache overflow: slot {end} > max_len {self.max_len}")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class SlotKVCache:
    """A KV cache of ``slots`` independent sequences, each at its own length (continuous batching).

    Same storage as ``KVCache``, ``(num_layers, slots, num_kv_heads, max_len, head_dim)``, but a
    forward pass runs any subset of slots, each writing its tokens at its own positions. Before a
    forward, ``bind(slot_ids, write_pos)`` says which slot each batch row is and where its T new
    tokens go; ``update`` (called by every attention layer) then scatters the new keys and values
    and returns each row's slots ``[0, span)``, with ``span`` the furthest position written plus one.
    The caller's attention mask must hide, per row, the positions beyond that row's own tokens.
    """

    def __init__(self, config: ModelConfig, slots: int, max_len: int, *, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        if slots < 1 or max_len < 1:
            raise LowbitError(f"a KV cache needs slots >= 1 and max_len >= 1, got slots={slots}, max_len={max_len}")
        shape = (config.num_layers, slots, config.num_kv_heads, max_len, config.head_dim)
        # zeros, not empty: a row's gathered span includes positions only other rows wrote, and
        # uninitialized memory can hold NaN bit patterns, which a masked softmax does not remove
        # (NaN * 0 is NaN). Stale values left by finished requests are finite, so they stay harmless.
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.slots, self.max_len = slots, max_len
        self._rows: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None

    @staticmethod
    def bytes_per_slot(config: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * max_len * config.head_dim * elem

    def bind(self, slot_ids: torch.Tensor, write_pos: torch.Tensor) -> int:
        """Rows of the next forward: slot_ids (B,) int64, write_pos (B, T) int64. Returns the span."""
        span = int(write_pos.max()) + 1
        if span > self.max_len:
            raise LowbitError(f"KV cache overflow: position {span - 1} >= max_len {self.max_len}")
        self._rows, self._pos = slot_ids, write_pos
        return span

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter k, v (B, kv_heads, T, head_dim) to the bound positions; return (B, kv_heads, span, head_dim)."""
        rows, pos = self._rows, self._pos
        if rows is None:
            raise LowbitError("SlotKVCache.update before bind()")
        r = rows[:, None].expand_as(pos)
        # (B, T) index pairs -> (B, T, kv_heads, head_dim) values
        self.keys[layer][r, :, pos] = k.transpose(1, 2)
        self.values[layer][r, :, pos] = v.transpose(1, 2)
        span = int(pos.max()) + 1
        return self.keys[layer][rows, :, :span], self.values[layer][rows, :, :span]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes
