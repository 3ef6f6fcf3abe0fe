"""A decode step's rotary embedding and quantized KV-cache write in one launch.

The plain (fp16/bf16) cache has ``lowbit.kernels.fused.rope_store``. A quantized cache went through
the model's rotary kernel, then ``lowbit.kernels.attention.quantize_kv`` in PyTorch (absmax, divide,
round, clamp, cast, nibble packing: about ten kernels for K and ten for V) and two indexed writes
per layer. In a CUDA graph each small kernel still costs 2-4 us of GPU time, so at batch 64 on the
Llama-3-8B shape the quantized caches spent ~3 ms per decode step writing one token per row, and
decoded no faster than the fp16 cache although their attention kernel reads 2-4x fewer bytes
(H200, 2026-12-02: int4 0.98x, int8 0.98x of fp16 KV at context 4096; docs/engine.md).

This kernel does it in one pass, one program per row: rotate the query and key heads, quantize each
key and value head with one scale per (token, head) and write codes and scales at (slot, head, pos).

Numerics: those of ``rope_store_reference`` then ``quantize_kv`` (per-token absmax scales, IEEE
division, round half to even, the int4 halves layout), bit for bit: the rotated key is rounded to
the cache's dtype before it is quantized, as the reference stores it. Formats: int8, int4 and fp8
e4m3 with dynamic per-(token, head) scales. Grouped scales and static fp8 scales keep the reference
path (``SlotKVCache._store``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels.act_quant import _ROUND, codes_of, scale_of
from lowbit.kernels.fused import _rotate
from lowbit.kernels.launch import next_power_of_2, triton_launch
from lowbit.kernels.pdl import launch_options, start_small

# cache dtype -> (kernel KIND, QMAX): the quantize_activation limits (int: 2**(bits-1) - 1, fp8: 448)
KV_KINDS = {"int8": (0, 127.0), "int4": (1, 7.0), "fp8_e4m3": (2, 448.0)}


@triton.jit
def _store_quantized(c_ptr, s_ptr, row, x1, x2, rd, ok, HALF: tl.constexpr, KIND: tl.constexpr,
                     QMAX: tl.constexpr, ROUND: tl.constexpr):
    """Quantize heads (BLOCK_H, HALF) x2 (the two channel halves, fp32) with one scale per head and
    store them at cache row ``row`` (BLOCK_H, 1): codes at row * code_dim, the scale at ``row``."""
    absmax = tl.maximum(tl.max(tl.abs(x1), axis=1), tl.max(tl.abs(x2), axis=1))
    scale = scale_of(absmax, QMAX)[:, None]
    q1 = codes_of(x1, scale, KIND == 2, QMAX, ROUND)
    q2 = codes_of(x2, scale, KIND == 2, QMAX, ROUND)
    if KIND == 1:  # byte j: channel j in the low nibble, channel j + HALF in the high one (two's complement)
        b = (q1.to(tl.int32) & 0xF) | ((q2.to(tl.int32) & 0xF) << 4)
        tl.store(c_ptr + row * HALF + rd[None, :], b.to(tl.uint8), mask=ok)
    else:
        tl.store(c_ptr + row * 2 * HALF + rd[None, :], q1, mask=ok)
        tl.store(c_ptr + row * 2 * HALF + HALF + rd[None, :], q2, mask=ok)
    tl.store(s_ptr + row, scale, mask=ok)


@triton.jit
def _rope_quant_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr,
                             slot_ptr, pos_ptr, HQ, HKV, L, stride_qb, stride_qh, stride_kb, stride_kh,
                             stride_vb, stride_vh, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                             BLOCK_HKV: tl.constexpr, KIND: tl.constexpr, QMAX: tl.constexpr,
                             ROUND: tl.constexpr, PDL: tl.constexpr = False):
    start_small(PDL)
    b = tl.program_id(0).to(tl.int64)
    rd = tl.arange(0, HALF)
    cs = cos_ptr + b * 2 * HALF
    sn = sin_ptr + b * 2 * HALF
    rq = tl.arange(0, BLOCK_HQ)
    q_ok = rq[:, None] < HQ
    o1, o2 = _rotate(q_ptr + b * stride_qb + rq[:, None] * stride_qh, rd, q_ok, cs, sn, HALF)
    qo = q_out_ptr + (b * HQ + rq[:, None]) * 2 * HALF
    tl.store(qo + rd[None, :], o1, mask=q_ok)
    tl.store(qo + HALF + rd[None, :], o2, mask=q_ok)
    rk = tl.arange(0, BLOCK_HKV)
    k_ok = rk[:, None] < HKV
    # the rotated key in the activation dtype (as the reference path stores it), then fp32
    k1, k2 = _rotate(k_ptr + b * stride_kb + rk[:, None] * stride_kh, rd, k_ok, cs, sn, HALF)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    pos = tl.load(pos_ptr + b)
    row = (slot * HKV + rk[:, None]) * L + pos  # cache (slots, HKV, L, ...) row of this token and head
    _store_quantized(kc_ptr, ks_ptr, row, k1.to(tl.float32), k2.to(tl.float32), rd, k_ok, HALF, KIND, QMAX, ROUND)
    vb = v_ptr + b * stride_vb + rk[:, None] * stride_vh
    v1 = tl.load(vb + rd[None, :], mask=k_ok, other=0.0).to(tl.float32)
    v2 = tl.load(vb + HALF + rd[None, :], mask=k_ok, other=0.0).to(tl.float32)
    _store_quantized(vc_ptr, vs_ptr, row, v1, v2, rd, k_ok, HALF, KIND, QMAX, ROUND)


def rope_quant_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     key_codes: torch.Tensor, key_scales: torch.Tensor, value_codes: torch.Tensor,
                     value_scales: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """``rope_store`` for a quantized cache with one scale per (token, head).

    q (B, 1, HQ, hd), k and v (B, 1, HKV, hd) fp16/bf16 with a unit last stride; cos, sin (B, 1, hd)
    in q's dtype; key_codes / value_codes: one layer's cache, contiguous, (slots, HKV, L, hd) int8 or
    float8_e4m3fn, or (slots, HKV, L, hd / 2) uint8 for int4 (the halves layout of
    ``lowbit.kernels.attention``); key_scales / value_scales (slots, HKV, L, 1) fp32, contiguous;
    slots (B,) int32; pos (B,) int32/int64, each < L (not checked: CUDA graphs capture this call).
    Returns the rotated queries (B, HQ, hd) contiguous.
    """
    if kv_dtype not in KV_KINDS:
        raise LowbitError(f"rope_quant_store takes an int8, int4 or fp8_e4m3 cache, got {kv_dtype!r}")
    kind, qmax = KV_KINDS[kv_dtype]
    B, T, HQ, hd = q.shape
    HKV = k.shape[2]
    if T != 1 or k.shape != (B, 1, HKV, hd) or v.shape != k.shape or cos.shape != (B, 1, hd) or sin.shape != cos.shape:
        raise LowbitError(f"rope_quant_store takes one token per row: q (B, 1, HQ, hd), k/v (B, 1, HKV, hd), "
                          f"cos/sin (B, 1, hd); got q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}")
    code_d = hd // 2 if kind == 1 else hd
    code_dtype = {0: torch.int8, 1: torch.uint8, 2: torch.float8_e4m3fn}[kind]
    S, L = key_codes.shape[0], key_codes.shape[2]
    for name, c, s in (("key", key_codes, key_scales), ("value", value_codes, value_scales)):
        if c.shape != (S, HKV, L, code_d) or c.dtype != code_dtype or not c.is_contiguous():
            raise LowbitError(f"rope_quant_store: the {name} codes must be contiguous ({S}, {HKV}, {L}, {code_d}) "
                              f"{code_dtype}, got {c.dtype} {tuple(c.shape)}")
        if s.shape != (S, HKV, L, 1) or s.dtype != torch.float32 or not s.is_contiguous():
            raise LowbitError(f"rope_quant_store: the {name} scales must be contiguous ({S}, {HKV}, {L}, 1) fp32 "
                              f"(one per token and head), got {s.dtype} {tuple(s.shape)}")
    if min(q.stride(-1), k.stride(-1), v.stride(-1)) != 1 or hd & (hd - 1) or cos.dtype != q.dtype \
            or q.dtype not in (torch.float16, torch.bfloat16):
        raise LowbitError("rope_quant_store: fp16/bf16 q, k, v with a unit last stride, a power-of-two head_dim "
                          "and cos/sin in q's dtype")
    out = torch.empty((B, HQ, hd), dtype=q.dtype, device=q.device)
    if B:
        triton_launch(_rope_quant_store_kernel, (B,),
            q, k, v, cos.contiguous(), sin.contiguous(), out, key_codes, key_scales, value_codes, value_scales,
            slots, pos, HQ, HKV, L, q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
            HALF=hd // 2, BLOCK_HQ=next_power_of_2(HQ), BLOCK_HKV=next_power_of_2(HKV), KIND=kind, QMAX=qmax,
            ROUND=_ROUND, **launch_options(q.device))
    return out
