"""Fused elementwise kernels of the decoder: residual add + RMSNorm, rotary embedding, SiLU-gate.

At decode a Llama layer is ~7 small GEMMs and, in eager PyTorch, ~35 elementwise kernels (RMSNorm
alone is 6: cast, square, mean, rsqrt, scale, cast back, weight). Inside a CUDA graph each still
costs 2-3 us of GPU time at batch 1, which for Llama-3-8B adds up to milliseconds per token, as
much as the int4 GEMMs themselves (measured: docs/engine.md). Each kernel here replaces one such
chain with one pass over the data.

Numerics: each kernel reproduces its PyTorch reference (``*_reference``, the code of
``lowbit.model.llama``), rounding to the activation dtype where PyTorch does. In the interpreter the
rotary kernel is bit-identical; compiled on the H100 a product occasionally rounds one step apart
(tests allow 1e-2). RMSNorm differs by the order of its fp32 sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels.act_quant import (
    MAX_K,
    check_smooth,
    codes_of,
    empty_codes,
    quant_constants,
    quantize_activations,
    quantize_row,
    scale_of,
)
from lowbit.kernels.activations import ActQuantSpec, QuantizedActivations
from lowbit.kernels.launch import cdiv, next_power_of_2, triton_launch
from lowbit.kernels.pdl import launch_options, start_small


def add_rmsnorm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual); x, residual (..., H) fp16/bf16/fp32, weight (H,)."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, smooth_ptr, q_ptr, s_ptr, H, eps,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                        FP8: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr, PDL: tl.constexpr = False):
    start_small(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)).to(
            x_ptr.dtype.element_ty)  # the residual stream stays in the activation dtype, as in PyTorch
        tl.store(h_ptr + row * H + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    out = (w * normed).to(x_ptr.dtype.element_ty)
    if QUANT:  # the next GEMM's 8-bit input, from the rounded output: what quantize_activations would make
        quantize_row(out.to(tl.float32), ok, cols, smooth_ptr, q_ptr + row * H, s_ptr + row,
                     HAS_SMOOTH, FP8, QMAX, ROUND)
    else:
        tl.store(out_ptr + row * H + cols, out, mask=ok)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                quant: ActQuantSpec | None = None) -> tuple[torch.Tensor | QuantizedActivations, torch.Tensor]:
    """Fused ``add_rmsnorm_reference``: one read of x (and residual), one write of each output.

    With ``quant``, the normalized output is not written: it is quantized per token for the next GEMM
    (``QuantizedActivations``, bit-identical to ``quantize_activations`` on the unquantized output),
    which saves that GEMM's separate activation-quantization kernel (~2.6 us each at decode, H100).
    """
    H = x.shape[-1]
    if weight.shape != (H,) or (residual is not None and residual.shape != x.shape):
        raise LowbitError(f"add_rmsnorm: x {tuple(x.shape)}, residual and weight ({H},) must agree")
    if weight.dtype != x.dtype:  # PyTorch's product would promote; keep the reference's semantics there
        out, h = add_rmsnorm_reference(x, residual, weight, eps)
        return (out if quant is None else _quantized(out, quant)), h
    xc = x.contiguous()
    rows = xc.numel() // H
    h = xc if residual is None else torch.empty_like(xc)
    if quant is None:
        out, q, s, consts = torch.empty_like(xc), xc, xc, quant_constants("int")
    else:
        check_smooth(quant.smooth, H)
        out, consts = xc, quant_constants(quant.dtype)
        q, s = empty_codes(rows, H, quant.dtype, x.device)
    if rows:
        triton_launch(_add_rmsnorm_kernel, (rows,),
            xc, residual.contiguous() if residual is not None else xc, weight, out, h,
            quant.smooth if quant is not None and quant.smooth is not None else xc, q, s, H, eps,
            HAS_RES=residual is not None, BLOCK=next_power_of_2(H), QUANT=quant is not None,
            HAS_SMOOTH=quant is not None and quant.smooth is not None,
            num_warps=(4 if H <= 4096 else 8) if quant is None else _quant_row_warps(next_power_of_2(H)),
            **consts, **launch_options(x.device))
    if quant is None:
        return out, h
    return QuantizedActivations(q.view(x.shape), s, x.dtype), h


def _quant_row_warps(block: int) -> int:
    """Warps of a one-program-per-row kernel that quantizes: with the quantization's IEEE divisions per
    element, the row's arithmetic on one SM is what the kernel waits for at decode, so it gets all the
    warps it can use."""
    return max(4, min(32, block // 128))


def _quantized(x: torch.Tensor, quant: ActQuantSpec) -> QuantizedActivations:
    """``quant`` applied by the standalone kernel (the fused kernels' fallback for odd dtypes)."""
    q, s = quantize_activations(x.reshape(-1, x.shape[-1]), quant.dtype, quant.smooth)
    return QuantizedActivations(q.view(x.shape), s, x.dtype)


def rope_reference(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t (B, T, heads, hd), cos/sin (B, T, hd) -> t * cos + rotate_half(t) * sin, same shape and dtype."""
    c, s = cos[:, :, None], sin[:, :, None]
    t1, t2 = t.chunk(2, dim=-1)
    return t * c + torch.cat((-t2, t1), dim=-1) * s


@triton.jit
def _rotate(base, rd, ok, cs, sn, HALF: tl.constexpr):
    """Rotary embedding of the heads at ``base + rh * stride`` (pointers (BLOCK_H, 1)): the two halves,
    each product and the sum rounded to the activation dtype, as PyTorch's three elementwise ops do."""
    x1 = tl.load(base + rd[None, :], mask=ok, other=0.0)
    x2 = tl.load(base + HALF + rd[None, :], mask=ok, other=0.0)
    DT = x1.dtype
    c1 = tl.load(cs + rd)[None, :].to(tl.float32)
    c2 = tl.load(cs + HALF + rd)[None, :].to(tl.float32)
    s1 = tl.load(sn + rd)[None, :].to(tl.float32)
    s2 = tl.load(sn + HALF + rd)[None, :].to(tl.float32)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    o1 = (f1 * c1).to(DT).to(tl.float32) + (-f2 * s1).to(DT).to(tl.float32)
    o2 = (f2 * c2).to(DT).to(tl.float32) + (f1 * s2).to(DT).to(tl.float32)
    return o1.to(DT), o2.to(DT)


@triton.jit
def _rope_kernel(t_ptr, cos_ptr, sin_ptr, out_ptr, T, HEADS, stride_b, stride_t, stride_h,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    start_small(PDL)
    tok = tl.program_id(0)  # b * T + t
    b = tok // T
    t = tok % T
    rh = tl.arange(0, BLOCK_H)
    rd = tl.arange(0, HALF)
    ok = rh[:, None] < HEADS
    base = t_ptr + b.to(tl.int64) * stride_b + t * stride_t + rh[:, None] * stride_h
    o1, o2 = _rotate(base, rd, ok, cos_ptr + tok.to(tl.int64) * 2 * HALF, sin_ptr + tok.to(tl.int64) * 2 * HALF,
                     HALF)
    ob = out_ptr + (tok.to(tl.int64) * HEADS + rh[:, None]) * 2 * HALF
    tl.store(ob + rd[None, :], o1, mask=ok)
    tl.store(ob + HALF + rd[None, :], o2, mask=ok)


def rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Fused ``rope_reference``; t may be a strided view (e.g. columns of a fused QKV output) whose last
    dim is contiguous. Returns a contiguous (B, T, heads, hd) tensor."""
    B, T, heads, hd = t.shape
    if cos.shape != (B, T, hd) or sin.shape != cos.shape or hd % 2 or t.stride(-1) != 1:
        raise LowbitError(f"rope: t {tuple(t.shape)} with unit last stride and cos/sin (B, T, {hd}) expected")
    if cos.dtype != t.dtype or hd & (hd - 1):
        return rope_reference(t, cos, sin)
    out = torch.empty((B, T, heads, hd), dtype=t.dtype, device=t.device)
    if B * T:
        triton_launch(_rope_kernel, (B * T,), t, cos.contiguous(), sin.contiguous(), out, T, heads, t.stride(0), t.stride(1),
                               t.stride(2), HALF=hd // 2, BLOCK_H=next_power_of_2(heads),
                               **launch_options(t.device))
    return out


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr,
                       HQ, HKV, L, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                       HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                       PDL: tl.constexpr = False):
    """One token per program: rotate its query and key heads, write the query out and the rotated key
    and the value into the cache at (slot, head, pos)."""
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
    k1, k2 = _rotate(k_ptr + b * stride_kb + rk[:, None] * stride_kh, rd, k_ok, cs, sn, HALF)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    pos = tl.load(pos_ptr + b)
    dst = ((slot * HKV + rk[:, None]) * L + pos) * 2 * HALF  # cache (slots, HKV, L, 2 * HALF)
    tl.store(kc_ptr + dst + rd[None, :], k1, mask=k_ok)
    tl.store(kc_ptr + dst + HALF + rd[None, :], k2, mask=k_ok)
    rv = tl.arange(0, 2 * HALF)
    v = tl.load(v_ptr + b * stride_vb + rk[:, None] * stride_vh + rv[None, :], mask=k_ok, other=0.0)
    tl.store(vc_ptr + dst + rv[None, :], v, mask=k_ok)


def rope_store_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """What ``rope_store`` does, in PyTorch: returns the rotated q (B, HQ, hd) and writes the rotated k and v
    into ``keys`` / ``values`` (slots, HKV, L, hd) at [slots[b], :, pos[b]]."""
    qr = rope_reference(q, cos, sin)[:, 0]
    kr = rope_reference(k, cos, sin)[:, 0]
    rows, p = slots.long(), pos.long()
    keys[rows, :, p] = kr
    values[rows, :, p] = v[:, 0]
    return qr.contiguous()


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Decode step's rotary embedding fused with the KV-cache write (one launch instead of two rotary
    kernels and two index writes per layer).

    q (B, 1, HQ, hd), k and v (B, 1, HKV, hd): views of the fused QKV output (unit last stride);
    cos, sin (B, 1, hd); keys, values (slots, HKV, L, hd) contiguous, the layer's plain (unquantized)
    cache in q's dtype; slots (B,) int32 the cache slot of each row; pos (B,) int32/int64 the position
    each row writes. Returns the rotated queries, (B, HQ, hd) contiguous. Positions must be < L (the
    caller's invariant: no check here, so that CUDA graphs can capture it without a host sync).
    """
    B, T, HQ, hd = q.shape
    HKV = k.shape[2]
    if T != 1 or k.shape != (B, 1, HKV, hd) or v.shape != k.shape or cos.shape != (B, 1, hd) or sin.shape != cos.shape:
        raise LowbitError(f"rope_store takes one token per row: q (B, 1, HQ, hd), k/v (B, 1, HKV, hd), cos/sin "
                          f"(B, 1, hd); got q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}")
    if keys.shape[1] != HKV or keys.shape[3] != hd or values.shape != keys.shape or not keys.is_contiguous() \
            or not values.is_contiguous() or keys.dtype != q.dtype:
        raise LowbitError(f"rope_store: the cache must be contiguous (slots, {HKV}, L, {hd}) {q.dtype}, got "
                          f"{keys.dtype} {tuple(keys.shape)}")
    if min(q.stride(-1), k.stride(-1), v.stride(-1)) != 1 or hd & (hd - 1) or cos.dtype != q.dtype:
        raise LowbitError("rope_store: q, k, v need a unit last stride, a power-of-two head_dim and cos/sin in q's dtype")
    out = torch.empty((B, HQ, hd), dtype=q.dtype, device=q.device)
    if B:
        triton_launch(_rope_store_kernel, (B,),
            q, k, v, cos.contiguous(), sin.contiguous(), out, keys, values, slots, pos, HQ, HKV, keys.shape[2],
            q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
            HALF=hd // 2, BLOCK_HQ=next_power_of_2(HQ), BLOCK_HKV=next_power_of_2(HKV),
            **launch_options(q.device))
    return out


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _silu_gate(g, u):
    """silu(g) * u as PyTorch computes it: silu rounded to the activation dtype, then the product."""
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    return (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    start_small(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * N + cols, _silu_gate(g, u), mask=ok)


@triton.jit
def _silu_mul_quant_kernel(g_ptr, u_ptr, smooth_ptr, q_ptr, s_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr,
                           HAS_SMOOTH: tl.constexpr, FP8: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr,
                           PDL: tl.constexpr = False):
    """One program per row (the per-token scale needs the whole row): silu-gate, then quantize_row."""
    start_small(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0)
    out = _silu_gate(g, u).to(tl.float32)
    quantize_row(out, ok, cols, smooth_ptr, q_ptr + row * N, s_ptr + row, HAS_SMOOTH, FP8, QMAX, ROUND)


@triton.jit
def _silu_mul_absmax_kernel(g_ptr, u_ptr, smooth_ptr, h_ptr, part_ptr, N, stride_g, stride_u, P,
                            BLOCK: tl.constexpr, HAS_SMOOTH: tl.constexpr, PDL: tl.constexpr = False):
    """Row ``row``, chunk ``p`` of BLOCK columns: the rounded silu-gate product stored, and the chunk's
    absmax (of the smoothed values) stored for ``_quant_chunks_kernel``."""
    start_small(PDL)
    row = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    cols = p * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0)
    out = _silu_gate(g, u)
    tl.store(h_ptr + row * N + cols, out, mask=ok)
    x = out.to(tl.float32)
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + cols, mask=ok, other=1.0))
    tl.store(part_ptr + row * P + p, tl.max(tl.abs(x), axis=0))


@triton.jit
def _quant_chunks_kernel(h_ptr, smooth_ptr, part_ptr, q_ptr, s_ptr, N, P, BLOCK: tl.constexpr, P_PAD: tl.constexpr,
                         HAS_SMOOTH: tl.constexpr, FP8: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr,
                         PDL: tl.constexpr = False):
    """Row ``row``, chunk ``p``: the row's scale from the chunks' absmax, then this chunk's codes."""
    start_small(PDL)
    row = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    rp = tl.arange(0, P_PAD)
    scale = scale_of(tl.max(tl.load(part_ptr + row * P + rp, mask=rp < P, other=0.0), axis=0), QMAX)
    cols = p * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(h_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + cols, mask=ok, other=1.0))
    tl.store(q_ptr + row * N + cols, codes_of(x, scale, FP8, QMAX, ROUND), mask=ok)
    if p == 0:
        tl.store(s_ptr + row, scale)


# Rows up to which the SiLU-gate quantization is spread over chunks of _CHUNK columns (two launches)
# instead of one program per row: at decode one SM doing a 14336-wide row's exp and IEEE divisions
# took 7.6 us (H100, docs/engine.md); with more rows, rows alone fill the GPU.
_WIDE_ROWS = 64
_CHUNK = 1024


def _silu_mul_quant_wide(g2: torch.Tensor, u2: torch.Tensor, quant: ActQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu_mul`` + per-token quantization for a few long rows: (codes (rows, N), scales (rows,))."""
    rows, N = g2.shape
    P = cdiv(N, _CHUNK)
    h = torch.empty(rows, N, dtype=g2.dtype, device=g2.device)
    part = torch.empty(rows, P, dtype=torch.float32, device=g2.device)
    q, s = empty_codes(rows, N, quant.dtype, g2.device)
    smooth = quant.smooth if quant.smooth is not None else s
    pdl = launch_options(g2.device)
    triton_launch(_silu_mul_absmax_kernel, (rows, P), g2, u2, smooth, h, part, N, g2.stride(0), u2.stride(0), P, BLOCK=_CHUNK,
                                       HAS_SMOOTH=quant.smooth is not None, **pdl)
    triton_launch(_quant_chunks_kernel, (rows, P), h, smooth, part, q, s, N, P, BLOCK=_CHUNK, P_PAD=next_power_of_2(P),
                                    HAS_SMOOTH=quant.smooth is not None, **quant_constants(quant.dtype), **pdl)
    return q, s


def silu_mul(gate: torch.Tensor, up: torch.Tensor,
             quant: ActQuantSpec | None = None) -> torch.Tensor | QuantizedActivations:
    """Fused ``silu(gate) * up``; gate, up (..., N) with unit last stride (views of a fused gate-up output
    are fine). Returns a contiguous (..., N) tensor, or with ``quant`` the product quantized per token for
    the next GEMM (as ``add_rmsnorm``)."""
    if gate.shape != up.shape or gate.stride(-1) != 1 or up.stride(-1) != 1 or gate.dtype != up.dtype:
        raise LowbitError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must match, unit last stride")
    N = gate.shape[-1]
    g2, u2 = gate.reshape(-1, N), up.reshape(-1, N)  # views when the rows are evenly strided
    if quant is not None:
        check_smooth(quant.smooth, N)
        if N > MAX_K:
            return _quantized(silu_mul(gate, up), quant)
        if 0 < g2.shape[0] <= _WIDE_ROWS and N > _CHUNK:
            q, s = _silu_mul_quant_wide(g2, u2, quant)
            return QuantizedActivations(q.view(gate.shape), s, gate.dtype)
        q, s = empty_codes(g2.shape[0], N, quant.dtype, gate.device)
        block = next_power_of_2(N)
        if g2.shape[0]:
            triton_launch(_silu_mul_quant_kernel, (g2.shape[0],),
                g2, u2, quant.smooth if quant.smooth is not None else s, q, s, N, g2.stride(0), u2.stride(0),
                BLOCK=block, HAS_SMOOTH=quant.smooth is not None, num_warps=_quant_row_warps(block),
                **quant_constants(quant.dtype), **launch_options(gate.device))
        return QuantizedActivations(q.view(gate.shape), s, gate.dtype)
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    BLOCK = 1024
    if g2.shape[0]:
        triton_launch(_silu_mul_kernel, (g2.shape[0], cdiv(N, BLOCK)), g2, u2, out, N, g2.stride(0), u2.stride(0), BLOCK=BLOCK,
                                                                 **launch_options(gate.device))
    return out.view(gate.shape)
