"""Decode attention that reads a quantized KV cache directly (split-KV, "flash-decoding" style).

One new query token per sequence attends over that sequence's cached keys and values, which are
stored quantized (``QuantizedKV``) and dequantized in registers: the cache is read once, at 4 or 8
bits, instead of being expanded to fp16 in memory first. Hopper has no int4 MMA and decode
attention is bound by the bytes of the cache anyway, so the products run in fp16 on tensor cores
after an in-register dequantization.

Layout of one layer's cache (``QuantizedKV``), for ``slots`` sequences of up to ``max_len`` tokens:
- int8: codes (slots, kv_heads, max_len, head_dim) int8; fp8 e4m3: the same shape in float8.
- int4: codes (slots, kv_heads, max_len, head_dim / 2) uint8 holding *halves*: byte j is channel j
  (low nibble) and channel j + head_dim/2 (high nibble), two's complement. So each nibble plane
  pairs with one contiguous half of the query (as the int4 weights in ``lowbit.kernels.layout``).
- scales (slots, kv_heads, max_len, head_dim / group) fp32 for int caches (dynamic, per token, head
  and group, the numerics of ``lowbit.numerics.kv.fake_quantize_kv``); for fp8 one static scale per
  head (kv_heads,) fp32, or per-token scales like the int caches when there is none.

Work split: program (row, kv_head, split) computes, for the ``G`` query heads sharing that KV head
(GQA), the softmax-weighted sum over its share of the row's tokens, with a running max and sum;
a second small kernel merges the splits. Rows map to cache slots through ``slot_of_row``, so a
continuous-batching engine can run any subset of its slots.

Numerics: ``decode_attention_reference`` (fp32 softmax on the dequantized cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels.launch import next_power_of_2, triton_launch
from lowbit.kernels.pdl import launch_options, start_small
from lowbit.kernels.unpack import USE_ASM, nibbles_float


@dataclass
class QuantizedKV:
    """One layer's K or V cache, quantized (module docstring), or plain ("fp16": codes are the values)."""

    codes: torch.Tensor  # int8 / float8_e4m3fn (S, H, L, D), uint8 (S, H, L, D/2) for int4, fp16/bf16 for "fp16"
    scales: torch.Tensor  # fp32 (S, H, L, D/group), or (H,) static fp8; unused (may be empty) for "fp16"
    dtype: str  # "int8", "int4", "fp8_e4m3" or "fp16" (a plain cache in the model's dtype, fp16 or bf16)
    group: int  # channels per scale (head_dim for one scale per token and head)

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * (2 if self.dtype == "int4" else 1)


def quantize_kv(t: torch.Tensor, dtype: str, group: int | None = None,
                static_scale: torch.Tensor | None = None) -> QuantizedKV:
    """Quantize K or V ``t`` (S, H, L, D) fp16/bf16/fp32 into the cache layout (reference code path).

    ``dtype`` "int8", "int4", "fp8_e4m3", or "fp16" for a plain cache that keeps ``t`` as it is."""
    from lowbit.numerics.primitives import FP8_MAX, quantize_activation

    S, H, L, D = t.shape
    if dtype == "fp16":  # a plain cache: values kept in t's dtype (fp16 or bf16), no scales
        return QuantizedKV(t.contiguous(), t.new_empty(0, dtype=torch.float32), "fp16", D)
    g = group or D
    if D % g or (dtype == "int4" and D % 2):
        raise LowbitError(f"head_dim {D} must be a multiple of the KV group {g} (and even for int4)")
    if dtype == "fp8_e4m3" and static_scale is not None:
        s = static_scale.float().view(1, H, 1, 1)
        codes = (t.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return QuantizedKV(codes, static_scale.float().contiguous(), dtype, D)
    bits = {"int8": 8, "int4": 4, "fp8_e4m3": 8}.get(dtype)
    if bits is None:
        raise LowbitError(f"KV cache dtype must be int8, int4, fp8_e4m3 or fp16, got {dtype!r}")
    adtype = "fp8_e4m3" if dtype == "fp8_e4m3" else "int"
    codes, scale = quantize_activation(t.reshape(S, H, L, D // g, g), bits, adtype)
    codes, scale = codes.reshape(S, H, L, D), scale.reshape(S, H, L, D // g).float()
    if dtype == "int4":
        nib = codes.to(torch.int16) & 0xF
        codes = (nib[..., : D // 2] | (nib[..., D // 2:] << 4)).to(torch.uint8)
    return QuantizedKV(codes.contiguous(), scale.contiguous(), dtype, g)


def dequantize_kv(kv: QuantizedKV) -> torch.Tensor:
    """fp32 (S, H, L, D) from the cache layout."""
    if kv.dtype == "fp16":
        return kv.codes.float()
    if kv.dtype == "int4":
        b = kv.codes.to(torch.int16)
        lo, hi = b & 0xF, (b >> 4) & 0xF
        q = torch.cat([lo, hi], dim=-1)
        q = torch.where(q >= 8, q - 16, q).float()
    else:
        q = kv.codes.float()
    if kv.scales.ndim == 1:  # static per-head fp8 scale
        return q * kv.scales.view(1, -1, 1, 1)
    return q * kv.scales.repeat_interleave(kv.group, dim=-1)


def decode_attention_reference(q: torch.Tensor, k: QuantizedKV, v: QuantizedKV, lengths: torch.Tensor,
                               slot_of_row: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, Hq, D) -> (B, Hq, D) in q's dtype; row b attends to tokens [0, lengths[b]) of slot slot_of_row[b]."""
    kf, vf = dequantize_kv(k), dequantize_kv(v)
    B, Hq, D = q.shape
    Hkv = kf.shape[1]
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n, s = int(lengths[b]), int(slot_of_row[b])
        kk = kf[s, :, :n].repeat_interleave(Hq // Hkv, dim=0)  # (Hq, n, D)
        vv = vf[s, :, :n].repeat_interleave(Hq // Hkv, dim=0)
        att = torch.softmax((q[b].float()[:, None, :] @ kk.transpose(1, 2))[:, 0] * scale, dim=-1)  # (Hq, n)
        out[b] = (att[:, None, :] @ vv)[:, 0]
    return out.to(q.dtype)


@triton.jit
def _load_kv_tile(codes_ptr, scales_ptr, base, sbase, rs, rd, s_ok, D_HALF: tl.constexpr,
                  GROUP: tl.constexpr, N_GROUPS: tl.constexpr, KIND: tl.constexpr, HI: tl.constexpr,
                  STATIC: tl.constexpr, static_scale):
    """(BLOCK_S, D_HALF) fp32 dequantized values of channels [HI * D_HALF, (HI + 1) * D_HALF), for
    caches scaled per group or statically (per-token and plain caches: ``_raw_codes``).

    KIND 0 int8, 1 int4 (halves layout), 2 fp8 e4m3 (passed as its bytes, uint8), 3 a plain fp16/bf16
    cache (no scale). ``base`` points at the slot/head's first token.
    """
    if KIND == 1:
        b = tl.load(codes_ptr + base + rs[:, None] * D_HALF + rd[None, :], mask=s_ok[:, None], other=0)
        b = b.to(tl.int32)
        if HI:
            u = (b >> 4) & 0xF
        else:
            u = b & 0xF
        q = (u ^ 8) - 8  # 4-bit two's complement
        vals = q.to(tl.float32)
    else:
        col = rd + HI * D_HALF
        raw = tl.load(codes_ptr + base + rs[:, None] * (2 * D_HALF) + col[None, :], mask=s_ok[:, None], other=0)
        if KIND == 2:
            # fp8 travels as uint8: a masked load's `other` cannot be cast to fp8, and a byte 0 is +0.0
            vals = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            vals = raw.to(tl.float32)
    if KIND == 3:
        pass
    elif STATIC:
        vals = vals * static_scale
    else:
        g = (rd + HI * D_HALF) // GROUP
        sc = tl.load(scales_ptr + sbase + rs[:, None] * N_GROUPS + g[None, :], mask=s_ok[:, None], other=0.0)
        vals = vals * sc
    return vals


# four int8 codes ($2) -> four fp16 numbers 1024 + q + 128 ($0: codes 0-1, $1: codes 2-3): the sign bit
# flipped makes q + 128 a byte, and prmt puts each byte under the fp16 exponent byte 0x64
_I8_F16_ASM = tl.constexpr("{ .reg .b32 t;\nxor.b32 t, $2, 0x80808080;\nprmt.b32 $0, t, 0x64646464, 0x4140;\n"
                           "prmt.b32 $1, t, 0x64646464, 0x4342;\n}")


@triton.jit
def _int8_as_fp16(raw, ASM: tl.constexpr):
    """int8 codes -> the same values in fp16, exactly, with no int -> float conversion."""
    if ASM:
        v = tl.inline_asm_elementwise(_I8_F16_ASM, "=r,=r,r", [raw], dtype=tl.float16, is_pure=True, pack=4)
    else:  # the int16 q + 0x6400 + 128 is the bit pattern of 1024 + q + 128
        v = (raw.to(tl.int16) + 25728).to(tl.float16, bitcast=True)
    return v - 1152.0


@triton.jit
def _raw_codes(codes_ptr, base, rs, rd, s_ok, D_HALF: tl.constexpr, KIND: tl.constexpr, IS_FP16: tl.constexpr,
               ASM: tl.constexpr):
    """The (BLOCK_S, D_HALF) low and high channel halves of a per-token-scaled (or plain) cache tile as raw codes,
    exactly, in the query's dtype (fp16 or bf16), with no int -> float conversion instruction.

    An int -> fp32 cvt and then an fp32 -> fp16 cvt per value both run at a quarter of the SM's
    rate: at batch 64 and 4096 tokens of int4 cache that is ~8 ms per Llama-3-8B decode step on the
    H200, more than reading an fp16 cache takes (the int4 cache measured 0.87x of fp16's decode
    speed there, issue 18). Instead, by the bits (``lowbit.kernels.unpack``):
    - int4 (one load for both halves): the nibbles with their sign bit flipped, u ^ 8 = q + 8, become
      BASE + q + 8 (fp16: BASE 1024 from ``| 0x6400``; bf16: 128 from ``| 0x4300``), minus BASE + 8;
    - int8, fp16 queries: each byte with its sign bit flipped (q + 128) under the fp16 exponent
      byte 0x64 is 1024 + q + 128, minus 1152 (``_int8_as_fp16``); a bf16
      query keeps the cvt path (bf16 has too few mantissa bits for 1024 + 255);
    - fp8 e4m3: one cvt straight to the query's dtype;
    - a plain fp16 / bf16 cache: no conversion at all.
    """
    if KIND == 1:
        b = tl.load(codes_ptr + base + rs[:, None] * D_HALF + rd[None, :], mask=s_ok[:, None], other=0)
        f = (b ^ 0x88).to(tl.uint8)
        off = 1032.0 if IS_FP16 else 136.0
        lo = nibbles_float(f, False, IS_FP16, ASM) - off
        hi = nibbles_float(f, True, IS_FP16, ASM) - off
    else:
        ptrs = codes_ptr + base + rs[:, None] * (2 * D_HALF) + rd[None, :]
        raw_lo = tl.load(ptrs, mask=s_ok[:, None], other=0)
        raw_hi = tl.load(ptrs + D_HALF, mask=s_ok[:, None], other=0)
        DT: tl.constexpr = tl.float16 if IS_FP16 else tl.bfloat16
        if KIND == 3:  # a plain cache in the query's dtype: as it is (it went through fp32 before)
            lo = raw_lo
            hi = raw_hi
        elif KIND == 2:  # fp8 travels as uint8 bytes
            lo = raw_lo.to(tl.float8e4nv, bitcast=True).to(DT)
            hi = raw_hi.to(tl.float8e4nv, bitcast=True).to(DT)
        elif IS_FP16:
            lo = _int8_as_fp16(raw_lo, ASM)
            hi = _int8_as_fp16(raw_hi, ASM)
        else:
            lo = raw_lo.to(tl.float32).to(DT)
            hi = raw_hi.to(tl.float32).to(DT)
    return lo, hi


@triton.jit
def _kv_halves(codes_ptr, scales_ptr, base, sbase, rs, rd, s_ok, D_HALF: tl.constexpr, GROUP: tl.constexpr,
               N_GROUPS: tl.constexpr, KIND: tl.constexpr, STATIC: tl.constexpr, static_scale,
               PER_TOKEN: tl.constexpr, IS_FP16: tl.constexpr, ASM: tl.constexpr):
    """A K or V tile's two channel halves: raw codes in the query's dtype for per-token and plain
    caches (their scales are applied by the caller), dequantized fp32 values otherwise."""
    if PER_TOKEN or KIND == 3:
        lo, hi = _raw_codes(codes_ptr, base, rs, rd, s_ok, D_HALF, KIND, IS_FP16, ASM)
    else:
        lo = _load_kv_tile(codes_ptr, scales_ptr, base, sbase, rs, rd, s_ok, D_HALF, GROUP, N_GROUPS, KIND, False,
                           STATIC, static_scale)
        hi = _load_kv_tile(codes_ptr, scales_ptr, base, sbase, rs, rd, s_ok, D_HALF, GROUP, N_GROUPS, KIND, True,
                           STATIC, static_scale)
    return lo, hi


@triton.jit
def _decode_attn_kernel(
    q_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr, len_ptr, slot_ptr, part_o_ptr, part_ml_ptr,
    Hq, Hkv, L, sm_scale, tokens_per_split,
    G: tl.constexpr, G_PAD: tl.constexpr, D_HALF: tl.constexpr, BLOCK_S: tl.constexpr,
    GROUP: tl.constexpr, N_GROUPS: tl.constexpr, KIND: tl.constexpr, STATIC: tl.constexpr,
    CODE_D: tl.constexpr, PER_TOKEN: tl.constexpr, IS_FP16: tl.constexpr = True, ASM: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    # PER_TOKEN (one scale per token and head, dynamic): the products run on the raw codes (exact in
    # fp16/bf16) and the scales are applied to the (G, BLOCK_S) scores for K and folded into the
    # probabilities for V, instead of scaling every (token, channel) value: the per-element scale
    # gather made the int caches 2.5x slower than fp16 (measured, docs/engine.md).
    start_small(PDL)
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    DT = q_ptr.dtype.element_ty  # the products run in the query's dtype on tensor cores, fp32 accumulation
    n = tl.load(len_ptr + row)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    rg = tl.arange(0, G_PAD)
    rd = tl.arange(0, D_HALF)
    g_ok = rg < G
    qh = kvh * G + rg  # query heads served by this KV head
    q_base = q_ptr + row * Hq * 2 * D_HALF + qh[:, None] * (2 * D_HALF)
    q_lo = tl.load(q_base + rd[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    q_hi = tl.load(q_base + D_HALF + rd[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    base = (slot * Hkv + kvh) * L * CODE_D
    sbase = (slot * Hkv + kvh) * L * N_GROUPS
    k_static = 1.0
    v_static = 1.0
    if STATIC:
        k_static = tl.load(ks_ptr + kvh)
        v_static = tl.load(vs_ptr + kvh)
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc_lo = tl.zeros((G_PAD, D_HALF), tl.float32)
    acc_hi = tl.zeros((G_PAD, D_HALF), tl.float32)
    start = split * tokens_per_split
    stop = tl.minimum(start + tokens_per_split, n)
    for s0 in range(start, stop, BLOCK_S):
        rs = s0 + tl.arange(0, BLOCK_S)
        s_ok = rs < stop
        k_lo, k_hi = _kv_halves(kc_ptr, ks_ptr, base, sbase, rs, rd, s_ok, D_HALF, GROUP, N_GROUPS, KIND, STATIC,
                                k_static, PER_TOKEN, IS_FP16, ASM)
        scores = (tl.dot(q_lo.to(DT), tl.trans(k_lo.to(DT)))
                  + tl.dot(q_hi.to(DT), tl.trans(k_hi.to(DT)))) * sm_scale  # (G_PAD, BLOCK_S)
        if PER_TOKEN:
            scores = scores * tl.load(ks_ptr + sbase + rs, mask=s_ok, other=0.0)[None, :]
        scores = tl.where(s_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_lo, v_hi = _kv_halves(vc_ptr, vs_ptr, base, sbase, rs, rd, s_ok, D_HALF, GROUP, N_GROUPS, KIND, STATIC,
                                v_static, PER_TOKEN, IS_FP16, ASM)
        if PER_TOKEN:
            # relative to the block's largest scale, so that p * scale keeps p's range in fp16
            vs = tl.load(vs_ptr + sbase + rs, mask=s_ok, other=0.0)
            vmax = tl.maximum(tl.max(vs, axis=0), 1e-30)
            pf = (p * (vs / vmax)[None, :]).to(DT)
        else:
            vmax = 1.0
            pf = p.to(DT)
        acc_lo = acc_lo * alpha[:, None] + tl.dot(pf, v_lo.to(DT)) * vmax
        acc_hi = acc_hi * alpha[:, None] + tl.dot(pf, v_hi.to(DT)) * vmax
        m_i = m_new
    # partial results of this split: unnormalized acc, running max and sum
    n_splits = tl.num_programs(2)
    o_base = ((row * Hq + qh) * n_splits + split)[:, None] * (2 * D_HALF)
    tl.store(part_o_ptr + o_base + rd[None, :], acc_lo, mask=g_ok[:, None])
    tl.store(part_o_ptr + o_base + D_HALF + rd[None, :], acc_hi, mask=g_ok[:, None])
    ml = ((row * Hq + qh) * n_splits + split) * 2
    tl.store(part_ml_ptr + ml, m_i, mask=g_ok)
    tl.store(part_ml_ptr + ml + 1, l_i, mask=g_ok)


@triton.jit
def _merge_splits_kernel(part_o_ptr, part_ml_ptr, out_ptr, N_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         D: tl.constexpr, PDL: tl.constexpr = False):
    start_small(PDL)
    rh = tl.program_id(0)  # row * Hq + head
    rsp = tl.arange(0, SPLITS_PAD)
    ok = rsp < N_SPLITS
    m = tl.load(part_ml_ptr + (rh * N_SPLITS + rsp) * 2, mask=ok, other=float("-inf"))
    lsum = tl.load(part_ml_ptr + (rh * N_SPLITS + rsp) * 2 + 1, mask=ok, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)  # splits that saw no token weigh 0
    denom = tl.sum(lsum * w, axis=0)
    rd = tl.arange(0, D)
    o = tl.load(part_o_ptr + (rh * N_SPLITS + rsp)[:, None] * D + rd[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / denom
    tl.store(out_ptr + rh * D + rd, out.to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k: QuantizedKV, v: QuantizedKV, lengths: torch.Tensor,
                     slot_of_row: torch.Tensor, scale: float | None = None, *, block_s: int | None = None,
                     tokens_per_split: int = 512, n_splits: int | None = None, check: bool = True,
                     num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """q (B, Hq, D) fp16/bf16 -> (B, Hq, D); row b attends to tokens [0, lengths[b]) of cache slot slot_of_row[b].

    ``lengths`` (B,) int32, each >= 1; ``slot_of_row`` (B,) int32. K and V share dtype, group and shape.
    The work is split along the tokens into ``n_splits`` parts when given (a fixed grid: no host sync,
    so the call can be captured in a CUDA graph; parts past a row's length do nothing), else into
    parts of ``tokens_per_split`` tokens of the longest row. ``check=False`` skips the checks that read
    ``lengths`` on the host (for graph capture, where the caller guarantees them).
    """
    if q.ndim != 3 or q.dtype not in (torch.float16, torch.bfloat16):
        raise LowbitError(f"decode attention takes q (B, heads, head_dim) fp16/bf16, got {q.dtype} {tuple(q.shape)}")
    B, Hq, D = q.shape
    if k.dtype != v.dtype or k.codes.shape != v.codes.shape or k.group != v.group:
        raise LowbitError("K and V caches must share dtype, group and shape")
    S, Hkv, L = k.codes.shape[:3]
    if k.head_dim != D or Hq % Hkv:
        raise LowbitError(f"q has {Hq} heads of {D}; the cache {Hkv} heads of {k.head_dim} (heads must divide)")
    if D & (D - 1) or D < 32:
        raise LowbitError(f"head_dim must be a power of two >= 32 for this kernel, got {D}")
    if k.dtype == "fp16" and k.codes.dtype != q.dtype:
        raise LowbitError(f"a plain KV cache must have the query's dtype {q.dtype}, got {k.codes.dtype}")
    if lengths.shape != (B,) or slot_of_row.shape != (B,):
        raise LowbitError("lengths and slot_of_row must be (B,)")
    if check and B and (int(lengths.min()) < 1 or int(lengths.max()) > L or int(slot_of_row.max()) >= S):
        raise LowbitError(f"lengths must be in [1, {L}] and slots < {S}")
    G = Hq // Hkv
    kind = {"int8": 0, "int4": 1, "fp8_e4m3": 2, "fp16": 3}[k.dtype]
    # tiles measured fastest at batch 64, context 4096 (bench/attention_sweep.py, docs/engine.md): 128
    # tokens x 4 warps for fp16 caches and, on the H200, for int4 (152 against 169 us per layer at 64 x 2);
    # 64 x 2 for the 8-bit ones. More splits than splits_for() gives changed none of them by over 3%.
    if block_s is None:
        block_s = 128 if kind in (1, 3) else 64
    if num_warps is None:
        num_warps = 4 if kind in (1, 3) else 2
    static = kind == 2 and k.scales.ndim == 1
    if n_splits is None:
        n_splits = max(1, math.ceil(int(lengths.max()) / tokens_per_split)) if B else 1
    else:
        tokens_per_split = math.ceil(math.ceil(L / n_splits) / block_s) * block_s
    kc, vc = k.codes, v.codes
    if kind == 2:
        kc, vc = kc.view(torch.uint8), vc.view(torch.uint8)  # the kernel bit-casts bytes to e4m3
    part_o = torch.empty(B, Hq, n_splits, D, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(B, Hq, n_splits, 2, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    if lengths.dtype != torch.int32:
        lengths = lengths.to(torch.int32)
    if slot_of_row.dtype != torch.int32:
        slot_of_row = slot_of_row.to(torch.int32)
    pdl = launch_options(q.device)
    triton_launch(_decode_attn_kernel, (B, Hkv, n_splits),
        q.contiguous(), kc, k.scales, vc, v.scales, lengths, slot_of_row,
        part_o, part_ml, Hq, Hkv, L, scale if scale is not None else D ** -0.5, tokens_per_split,
        G=G, G_PAD=max(16, next_power_of_2(G)), D_HALF=D // 2, BLOCK_S=block_s,
        GROUP=k.group, N_GROUPS=D // k.group, KIND=kind, STATIC=static, CODE_D=k.codes.shape[-1],
        PER_TOKEN=kind in (0, 1, 2) and not static and k.group == D, IS_FP16=q.dtype == torch.float16,
        ASM=USE_ASM, num_warps=num_warps, **({"num_stages": num_stages} if num_stages else {}), **pdl,
    )
    triton_launch(_merge_splits_kernel, (B * Hq,), part_o, part_ml, out, N_SPLITS=n_splits,
                                    SPLITS_PAD=max(2, next_power_of_2(n_splits)), D=D, **pdl)
    return out


def splits_for(batch: int, kv_heads: int, max_len: int, sms: int, block_s: int = 64) -> int:
    """A fixed split count for ``decode_attention(n_splits=...)``: about two programs per SM for the
    batch, never parts shorter than one block of ``block_s`` tokens."""
    want = math.ceil(2 * sms / max(1, batch * kv_heads))
    return max(1, min(want, math.ceil(max_len / block_s)))
