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
