"""Widen int4 weights (``PackedInt4`` or ``FragmentInt4``) to a plain row-major matrix for a cuBLAS-class GEMM at large M.

At large M a GEMM is bound by MMA throughput, and the fused int4 kernels spend their issue slots on
unpacking (docs/kernels.md). There, one pass that writes the weights out wide, followed by the best
8- or 16-bit GEMM, is faster than unpacking inside the GEMM: the pass costs ~N*K*1.5 bytes of
traffic, amortized over M rows.

- ``int8``: (N, K) int8 codes ``u - zero`` (exact, in [-15, 15]), for per-channel weights; the
  per-channel scale stays in the GEMM's epilogue (W8A8 numerics with the same int4 weights).
- ``fp16`` / ``bf16``: (N, K) ``(u - zero) * scale`` in that dtype (the W4A16 weight, rounded).

``FragmentInt4`` is read in place: its byte order within a 16-row x 128-column tile is a permutation
of the bits of (row, byte) (``layout.FRAG_BASES``), so the kernel computes where each byte lies from
its row and byte bits, and the widened rows are written as for ``PackedInt4``. Turning the fragment
order back into rows first (``FragmentInt4.to_packed``, a strided copy of 12 dims) cost the large-M
path ~0.4 ms on the H200's 8B gate+up (docs/kernels.md), more than the widening itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels.launch import cdiv, triton_launch
from lowbit.kernels.layout import FRAG_BASES, FragmentInt4, PackedInt4



@triton.jit
def _widen_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, group_size, stride_wn, stride_on,
    HAS_ZEROS: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr,
    HALF_K: tl.constexpr, FRAG: tl.constexpr, ROW_BITS: tl.constexpr, BYTE_BITS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF_K)
    k0 = t * 2 * HALF_K
    n_ok = rn[:, None] < N
    if FRAG:
        # FragmentInt4: 16 rows per qweight row, 1024 bytes per tile; the offset bit that holds row bit
        # i (byte bit i) is nibble i of ROW_BITS (BYTE_BITS), so the offset is one OR of shifted bits
        r = rn % 16
        roff = tl.zeros_like(r)
        for i in tl.static_range(4):
            roff |= ((r >> i) & 1) << ((ROW_BITS >> (4 * i)) & 15)
        joff = tl.zeros_like(rj)
        for i in tl.static_range(6):
            joff |= ((rj >> i) & 1) << ((BYTE_BITS >> (4 * i)) & 15)
        src = w_ptr + (rn // 16)[:, None] * stride_wn + t * 1024 + roff[:, None] + joff[None, :]
    else:
        src = w_ptr + rn[:, None] * stride_wn + t * HALF_K + rj[None, :]
    b = tl.load(src, mask=n_ok, other=0).to(tl.int32)
    lo = b & 0xF
    hi = b >> 4
    if HAS_ZEROS:
        g_lo = tl.minimum((k0 + rj) // group_size, (K - 1) // group_size)
        g_hi = tl.minimum((k0 + HALF_K + rj) // group_size, (K - 1) // group_size)
        lo = lo - tl.load(z_ptr + g_lo[None, :] * N + rn[:, None], mask=n_ok, other=0).to(tl.int32)
        hi = hi - tl.load(z_ptr + g_hi[None, :] * N + rn[:, None], mask=n_ok, other=0).to(tl.int32)
    else:
        lo = lo - 8
        hi = hi - 8
    ok_lo = n_ok & (k0 + rj[None, :] < K)
    ok_hi = n_ok & (k0 + HALF_K + rj[None, :] < K)
    out_lo = out_ptr + rn[:, None] * stride_on + k0 + rj[None, :]
    if SCALED:
        g_lo = tl.minimum((k0 + rj) // group_size, (K - 1) // group_size)
        g_hi = tl.minimum((k0 + HALF_K + rj) // group_size, (K - 1) // group_size)
        s_lo = tl.load(s_ptr + g_lo[None, :] * N + rn[:, None], mask=n_ok, other=0.0).to(tl.float32)
        s_hi = tl.load(s_ptr + g_hi[None, :] * N + rn[:, None], mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_lo, (lo.to(tl.float32) * s_lo).to(out_ptr.dtype.element_ty), mask=ok_lo)
        tl.store(out_lo + HALF_K, (hi.to(tl.float32) * s_hi).to(out_ptr.dtype.element_ty), mask=ok_hi)
    else:
        tl.store(out_lo, lo.to(tl.int8), mask=ok_lo)
        tl.store(out_lo + HALF_K, hi.to(tl.int8), mask=ok_hi)


def _frag_bits(int8: bool) -> tuple[int, int]:
    """(ROW_BITS, BYTE_BITS) of ``_widen_kernel``: nibble i = the fragment offset bit of row (byte) bit i."""
    rows = bytes_ = 0
    for b, (dr, dj) in enumerate(FRAG_BASES[int8]):
        if dr:
            rows |= b << (4 * (dr.bit_length() - 1))
        else:
            bytes_ |= b << (4 * (dj.bit_length() - 1))
    return rows, bytes_


def widen_int4(w: PackedInt4 | FragmentInt4, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) ``dtype`` weights from ``w`` in the packed (post-``perm``) column order.

    ``dtype`` torch.int8: codes minus zero (per-channel formats only; the scale is left to the GEMM);
    torch.float16 / torch.bfloat16: dequantized weights. ``out``: a reusable (N, K) buffer.
    """
    if dtype == torch.int8 and w.group_size is not None:
        raise LowbitError("widening to int8 keeps one scale per channel; grouped weights need fp16/bf16")
    if dtype not in (torch.int8, torch.float16, torch.bfloat16):
        raise LowbitError(f"widen_int4 makes int8, fp16 or bf16 weights, not {dtype}")
    N, K = w.N, w.K
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=w.qweight.device)
    elif out.shape != (N, K) or out.dtype != dtype:
        raise LowbitError(f"widen_int4: out must be {dtype} ({N}, {K})")
    block_n = 64
    grid = (cdiv(N, block_n), w.Kp // w.tile_k)
    frag = isinstance(w, FragmentInt4)
    row_bits, byte_bits = _frag_bits(w.int8) if frag else (0, 0)
    triton_launch(_widen_kernel, grid,
        w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales, out, N, K, w.group_size or K,
        w.qweight.stride(0), out.stride(0),
        HAS_ZEROS=w.zeros is not None, SCALED=dtype != torch.int8, BLOCK_N=block_n, HALF_K=w.tile_k // 2,
        FRAG=frag, ROW_BITS=row_bits, BYTE_BITS=byte_bits, num_warps=4,
    )
    return out
