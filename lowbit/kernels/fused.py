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
    empty_codes,
    quant_constants,
    quantize_activations,
    quantize_row,
)
from lowbit.kernels.activations import ActQuantSpec, QuantizedActivations


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
                        FP8: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr):
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
        _add_rmsnorm_kernel[(rows,)](
            xc, residual.contiguous() if residual is not None else xc, weight, out, h,
            quant.smooth if quant is not None and quant.smooth is not None else xc, q, s, H, eps,
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(H), QUANT=quant is not None,
            HAS_SMOOTH=quant is not None and quant.smooth is not None, num_warps=(4 if H <= 4096 else 8) if quant is None else _quant_row_warps(triton.next_power_of_2(H)),
            **consts)
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
def _rope_kernel(t_ptr, cos_ptr, sin_ptr, out_ptr, T, HEADS, stride_b, stride_t, stride_h,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    tok = tl.program_id(0)  # b * T + t
    b = tok // T
    t = tok % T
    rh = tl.arange(0, BLOCK_H)
    rd = tl.arange(0, HALF)
    ok = rh[:, None] < HEADS
    base = t_ptr + b.to(tl.int64) * stride_b + t * stride_t + rh[:, None] * stride_h
    x1 = tl.load(base + rd[None, :], mask=ok, other=0.0)
    x2 = tl.load(base + HALF + rd[None, :], mask=ok, other=0.0)
    DT = x1.dtype
    cs = cos_ptr + tok.to(tl.int64) * 2 * HALF
    sn = sin_ptr + tok.to(tl.int64) * 2 * HALF
    c1 = tl.load(cs + rd)[None, :].to(tl.float32)
    c2 = tl.load(cs + HALF + rd)[None, :].to(tl.float32)
    s1 = tl.load(sn + rd)[None, :].to(tl.float32)
    s2 = tl.load(sn + HALF + rd)[None, :].to(tl.float32)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    # each product and the sum rounded to the activation dtype, as PyTorch's three elementwise ops do
    o1 = (f1 * c1).to(DT).to(tl.float32) + (-f2 * s1).to(DT).to(tl.float32)
    o2 = (f2 * c2).to(DT).to(tl.float32) + (f1 * s2).to(DT).to(tl.float32)
    ob = out_ptr + (tok.to(tl.int64) * HEADS + rh[:, None]) * 2 * HALF
    tl.store(ob + rd[None, :], o1.to(DT), mask=ok)
    tl.store(ob + HALF + rd[None, :], o2.to(DT), mask=ok)


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
        _rope_kernel[(B * T,)](t, cos.contiguous(), sin.contiguous(), out, T, heads, t.stride(0), t.stride(1),
                               t.stride(2), HALF=hd // 2, BLOCK_H=triton.next_power_of_2(heads))
    return out


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # silu rounded to the activation dtype, then the product
    tl.store(out_ptr + row * N + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=ok)


@triton.jit
def _silu_mul_quant_kernel(g_ptr, u_ptr, smooth_ptr, q_ptr, s_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr,
                           HAS_SMOOTH: tl.constexpr, FP8: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr):
    """One program per row (the per-token scale needs the whole row): silu-gate, then quantize_row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    out = (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype).to(tl.float32)
    quantize_row(out, ok, cols, smooth_ptr, q_ptr + row * N, s_ptr + row, HAS_SMOOTH, FP8, QMAX, ROUND)


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
        q, s = empty_codes(g2.shape[0], N, quant.dtype, gate.device)
        block = triton.next_power_of_2(N)
        if g2.shape[0]:
            _silu_mul_quant_kernel[(g2.shape[0],)](
                g2, u2, quant.smooth if quant.smooth is not None else s, q, s, N, g2.stride(0), u2.stride(0),
                BLOCK=block, HAS_SMOOTH=quant.smooth is not None, num_warps=_quant_row_warps(block),
                **quant_constants(quant.dtype))
        return QuantizedActivations(q.view(gate.shape), s, gate.dtype)
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    BLOCK = 1024
    if g2.shape[0]:
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(N, BLOCK))](g2, u2, out, N, g2.stride(0), u2.stride(0), BLOCK=BLOCK)
    return out.view(gate.shape)
