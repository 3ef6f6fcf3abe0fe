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
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.formats import KVCacheFormat
from lowbit.model.config import ModelConfig


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q (B, heads, T, hd) over k, v (B, kv_heads, S, hd); mask (B, 1, T, S) bool, a
    ``torch.nn.attention.bias.CausalBias`` (SDPA's own causal kernels), or None."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``max_len`` tokens."""

    quantized = False  # stores the model's dtype; a quantized KV format is fake-quantized by the model
    needs_mask = True  # attention takes the caller's mask

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

    def attend(self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Store k, v (B, kv_heads, T, hd) at slots [start, start+T) and attend q (B, heads, T, hd) over [0, start+T)."""
        keys, values = self.update(layer, start, k, v)
        return sdpa(q, keys, values, mask)

    def attend_rotary(self, layer, start, q, k, v, cos, sin):  # see SlotKVCache.attend_rotary
        return None  # no fused path: the caller applies the rotary embedding and calls attend

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class SlotKVCache:
    """A KV cache of ``slots`` independent sequences, each at its own length (continuous batching).

    Per layer and for K and V: the plain cache (slots, kv_heads, max_len, head_dim) in the model's
    dtype, or a quantized one in the layout of ``lowbit.kernels.attention.QuantizedKV`` (int8 / fp8
    codes, int4 codes two per byte, fp32 scales per token, head and group), written quantized and read
    either by the decode-attention kernel, in place, or dequantized for the SDPA path. The quantized
    numbers are those of ``lowbit.numerics.kv.fake_quantize_kv`` (the model's reference path), so a
    quantized cache gives the tokens the reference gives.

    A forward pass runs any subset of slots, each writing its tokens at its own positions. Before it,
    ``bind`` says which slot each batch row is and where its T new tokens go. Then every attention
    layer calls ``attend``, which stores the new keys and values and attends:
    - in *kernel* mode (one new token per row, ``bind(..., kernel=True)``): the decode-attention kernel
      reads each row's slot in place, tokens ``[0, pos]``; no host sync, so CUDA graphs capture it;
    - otherwise (prefill chunks, CPU): each row's span ``[0, furthest position]`` is gathered (a copy)
      and SDPA applies the caller's mask, which must hide, per row, the positions beyond its tokens.
    """

    def __init__(self, config: ModelConfig, slots: int, max_len: int, *, device: torch.device | str,
                 dtype: torch.dtype, kv: KVCacheFormat | None = None,
                 static_scales: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None) -> None:
        if slots < 1 or max_len < 1:
            raise LowbitError(f"a KV cache needs slots >= 1 and max_len >= 1, got slots={slots}, max_len={max_len}")
        self.kv = kv or KVCacheFormat()
        L, H, D = config.num_layers, config.num_kv_heads, config.head_dim
        self.dtype = dtype
        self.slots, self.max_len, self.head_dim = slots, max_len, D
        code_dtype, code_d, n_scales = self.layout(self.kv, D, dtype)
        self.static = self.kv.dtype == "fp8_e4m3" and static_scales is not None and static_scales[0][0] is not None
        # zeros, not empty: a row's gathered span includes positions only other rows wrote, and
        # uninitialized memory can hold NaN bit patterns, which a masked softmax does not remove
        # (NaN * 0 is NaN). Stale values left by finished requests are finite, so they stay harmless.
        shape = (L, slots, H, max_len, code_d)
        self.keys = torch.zeros(shape, device=device, dtype=code_dtype)
        self.values = torch.zeros(shape, device=device, dtype=code_dtype)
        if self.static:
            self.key_scales = torch.stack([ks.float() for ks, _ in static_scales]).to(device)  # (L, H)
            self.value_scales = torch.stack([vs.float() for _, vs in static_scales]).to(device)
        elif n_scales:
            self.key_scales = torch.ones((L, slots, H, max_len, n_scales), device=device, dtype=torch.float32)
            self.value_scales = torch.ones_like(self.key_scales)
        else:
            self.key_scales = self.value_scales = torch.empty((L, 0), device=device, dtype=torch.float32)
        self._rows: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None  # kernel mode: (B,) int32 tokens each row attends to
        self._rows32: torch.Tensor | None = None
        self._contiguous = False  # bind(contiguous=True): every row at the same span - T .. span - 1
        self._slot: int | None = None  # bind(slot=...): that one row's slot
        self._span = 0
        self.splits = 1  # kernel mode: the decode-attention split count (fixed per batch size for graphs)

    @staticmethod
    def layout(kv: KVCacheFormat, head_dim: int, dtype: torch.dtype) -> tuple[torch.dtype, int, int]:
        """(code dtype, code elements per token and head, scales per token and head) of a cache format."""
        if kv.dtype == "fp16":
            return dtype, head_dim, 0
        group = kv.group_size or head_dim
        if head_dim % group:
            raise LowbitError(f"head_dim {head_dim} is not a multiple of the KV group size {group}")
        if kv.dtype == "int4":
            return torch.uint8, head_dim // 2, head_dim // group
        if kv.dtype == "int8":
            return torch.int8, head_dim, head_dim // group
        return torch.float8_e4m3fn, head_dim, 1  # fp8: per-token scales unless static per-head ones are given

    @staticmethod
    def bytes_per_slot(config: ModelConfig, max_len: int, dtype: torch.dtype, kv: KVCacheFormat | None = None) -> int:
        """Bytes of one sequence of ``max_len`` tokens over all layers, K and V, scales included."""
        code_dtype, code_d, n_scales = SlotKVCache.layout(kv or KVCacheFormat(), config.head_dim, dtype)
        elem = torch.empty((), dtype=code_dtype).element_size()
        per_token_head = code_d * elem + 4 * n_scales
        return 2 * config.num_layers * config.num_kv_heads * max_len * per_token_head

    def bind(self, slot_ids: torch.Tensor, write_pos: torch.Tensor, *, kernel: bool = False,
             contiguous: bool = False, slot: int | None = None) -> int:
        """Rows of the next forward: slot_ids (B,) int64, write_pos (B, T) int64.

        Returns the span (furthest position + 1; a host sync), or, with ``kernel=True`` (T must be 1),
        0 without reading the positions: the caller keeps them below ``max_len``.
        ``contiguous``: the caller's promise that every row writes positions span - T .. span - 1
        (prefill chunks of equal start and length): a plain cache then writes them as one slice of
        positions instead of per-position index pairs;
        ``slot``: with one row, its slot, whose span is then read as a view of the cache instead of
        gathered (a copy) for every layer.
        """
        self._rows, self._pos = slot_ids, write_pos
        self._contiguous, self._slot = contiguous, slot
        if kernel:
            if write_pos.shape[1] != 1:
                raise LowbitError("the decode-attention kernel takes one new token per row")
            # once per step, not once per layer: the kernel's int32 lengths and slot ids
            self._lengths = (write_pos[:, 0] + 1).to(torch.int32)
            self._rows32 = slot_ids.to(torch.int32)
            return 0
        self._lengths = None
        span = int(write_pos.max()) + 1
        if span > self.max_len:
            raise LowbitError(f"KV cache overflow: position {span - 1} >= max_len {self.max_len}")
        if slot is not None and (slot_ids.shape[0] != 1 or not contiguous):
            raise LowbitError("bind(slot=...) is for one row written contiguously")
        self._span = span
        return span

    @property
    def needs_mask(self) -> bool:
        """False in kernel mode: the kernel limits each row to its own tokens."""
        return self._lengths is None

    def layer_kv(self, layer: int):  # noqa: ANN201 - (QuantizedKV, QuantizedKV), imported lazily
        """Layer ``layer``'s K and V caches as ``QuantizedKV`` views (what the decode kernel reads)."""
        from lowbit.kernels.attention import QuantizedKV

        group = self.kv.group_size or self.head_dim
        return (QuantizedKV(self.keys[layer], self.key_scales[layer], self.kv.dtype, group),
                QuantizedKV(self.values[layer], self.value_scales[layer], self.kv.dtype, group))

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        from lowbit.kernels.attention import quantize_kv

        rows, pos = self._rows, self._pos
        if self._contiguous and not self.quantized:  # every row at span - T .. span - 1 (bind)
            end, T = self._span, k.shape[2]
            self.keys[layer][rows, :, end - T:end] = k.to(self.dtype)
            self.values[layer][rows, :, end - T:end] = v.to(self.dtype)
            return
        r = rows[:, None].expand_as(pos)  # (B, T) index pairs -> (B, T, kv_heads, ...) values
        for t, codes, scales in ((k, self.keys, self.key_scales), (v, self.values, self.value_scales)):
            if not self.quantized:  # stored as they are: no contiguous copy through quantize_kv
                codes[layer][r, :, pos] = t.transpose(1, 2).to(self.dtype)
                continue
            static = scales[layer] if self.static else None
            q = quantize_kv(t.to(self.dtype), self.kv.dtype, self.kv.group_size, static)
            codes[layer][r, :, pos] = q.codes.transpose(1, 2)
            if scales.ndim == 5:
                scales[layer][r, :, pos] = q.scales.transpose(1, 2)

    def _gather(self, layer: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        from lowbit.kernels.attention import QuantizedKV, dequantize_kv

        rows = self._rows
        if self._slot is not None and self.kv.dtype == "fp16":  # views of the slot's span: no copy
            return (self.keys[layer][self._slot:self._slot + 1, :, :span],
                    self.values[layer][self._slot:self._slot + 1, :, :span])
        out = []
        for kv in self.layer_kv(layer):
            codes = kv.codes[rows, :, :span]
            if self.kv.dtype == "fp16":
                out.append(codes)
                continue
            scales = kv.scales if self.static else kv.scales[rows, :, :span]
            out.append(dequantize_kv(QuantizedKV(codes, scales, kv.dtype, kv.group)).to(self.dtype))
        return out[0], out[1]

    def attend(self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Store k, v (B, kv_heads, T, hd) at the bound positions; attend q (B, heads, T, hd) -> (B, heads, T, hd)."""
        if self._rows is None:
            raise LowbitError("SlotKVCache.attend before bind()")
        self._store(layer, k, v)
        if self._lengths is not None:
            from lowbit.kernels.attention import decode_attention

            kq, vq = self.layer_kv(layer)
            out = decode_attention(q[:, :, 0], kq, vq, self._lengths, self._rows32, n_splits=self.splits, check=False)
            return out[:, :, None]
        keys, values = self._gather(layer, int(self._pos.max()) + 1)
        return sdpa(q, keys, values, mask)

    def attend_rotary(self, layer: int, start: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """Decode (kernel mode): the rotary embedding of q, k (B, 1, heads, hd), not yet applied, and
        the cache write of k and v done by one kernel, then decode attention -> (B, heads, 1, hd).
        A plain cache takes ``lowbit.kernels.fused.rope_store``; a quantized one with a scale per
        (token, head) ``lowbit.kernels.kv_store.rope_quant_store`` (quantized in the same pass).

        None where that path does not apply (prefill, grouped or static scales, other dtypes): the
        caller then applies the rotary embedding itself and calls ``attend``.
        """
        if self._lengths is None or q.dtype != self.dtype or cos.dtype != q.dtype:
            return None
        from lowbit.kernels.attention import decode_attention

        if self.quantized:
            if self.static or (self.kv.group_size or self.head_dim) != self.head_dim:
                return None
            from lowbit.kernels.kv_store import rope_quant_store

            qr = rope_quant_store(q, k, v, cos, sin, self.keys[layer], self.key_scales[layer], self.values[layer],
                                  self.value_scales[layer], self._rows32, self._pos[:, 0], self.kv.dtype)
        else:
            from lowbit.kernels.fused import rope_store

            qr = rope_store(q, k, v, cos, sin, self.keys[layer], self.values[layer], self._rows32, self._pos[:, 0])
        kq, vq = self.layer_kv(layer)
        return decode_attention(qr, kq, vq, self._lengths, self._rows32, n_splits=self.splits, check=False)[:, :, None]

    @property
    def quantized(self) -> bool:
        return self.kv.dtype != "fp16"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.keys, self.values, self.key_scales, self.value_scales))
