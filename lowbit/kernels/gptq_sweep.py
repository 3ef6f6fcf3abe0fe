"""GPTQ's column sweep over one block of columns, as one Triton kernel.

Inside a block of B columns (128 by default) GPTQ quantizes column c, divides its error by the
diagonal of the inverse Hessian's upper Cholesky factor U and subtracts ``err U[c, c:]`` from the
block's later columns (``lowbit.quant.gptq``). Written with PyTorch ops this is about a dozen kernels
per column: the 14336 + 3 x 4096 columns of a Llama-3-8B decoder layer made ~3e5 launches, and on an
H100 the sweep took 3.1 s of the layer's 10.3 s, bound by launch latency, not arithmetic (each launch
touches one (N,) column). Every row is independent within a block (the scales and U are shared, the
errors are per row), so one program takes a tile of rows, holds its (BLOCK_N, B) weights in registers
and runs the whole block's loop there: one launch per block.

Numerics are those of ``sweep_block_reference`` (the PyTorch loop, which runs on the CPU and defines
them): the same fp32 operations in the same order, division correctly rounded (``div_rn``), round half
to even, and no fused multiply-add (launched with ``enable_fp_fusion=False``: the reference rounds
``err * U`` before subtracting it). So the codes and errors equal the reference's bit for bit in the
interpreter and on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowbit.errors import LowbitError

_ROUND = 12582912.0  # 1.5 * 2**23: (v + R) - R rounds fp32 v half to even for |v| < 2**22
_BLOCK_N = 32  # rows per program: a (32, 128) fp32 tile is 32 registers a thread at 4 warps


def sweep_block_reference(W1: torch.Tensor, U1: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
                          lo: int, hi: int, prune: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's loop over one block, in PyTorch: the numerics the kernel reproduces.

    ``W1`` (N, B) fp32 the block's weights (updated by all earlier blocks; overwritten with the
    in-block updates), ``U1`` (B, B) fp32 the block's part of the upper Cholesky factor of H^-1,
    ``s`` (N, B) fp32 each column's scale, ``z`` (N, B) fp32 its zero point or None (symmetric),
    ``lo``/``hi`` the code range. Returns codes (N, B) fp32 (integral values) and the errors
    ``Err1`` (N, B) fp32, ``(w - dequant(code)) / U1[c, c]``, that GPTQ spreads over later blocks.

    ``prune`` (SparseGPT 2:4; the kernel has no such path): every 4 columns, called with the block's
    weights as updated so far (N, 4) and ``U1``'s diagonal there (4,), it returns a bool mask (N, 4)
    of weights forced to code 0 (symmetric formats: code 0 is exactly 0), whose error is compensated
    like quantization error. Block sizes and starts are then multiples of 4.
    """
    err_all = torch.empty_like(W1)
    codes = torch.empty_like(W1)
    mask = None
    for i in range(W1.shape[1]):
        if prune is not None and i % 4 == 0:
            mask = prune(W1[:, i : i + 4], U1.diagonal()[i : i + 4])
        w = W1[:, i]
        c = torch.round(w / s[:, i])
        if z is not None:
            c += z[:, i]
        c.clamp_(lo, hi)
        if mask is not None:
            c.masked_fill_(mask[:, i % 4], 0.0)
        codes[:, i] = c
        q = c - z[:, i] if z is not None else c.clone()
        q *= s[:, i]
        err = err_all[:, i]
        torch.div(w - q, U1[i, i], out=err)
        W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
    return codes, err_all


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _gptq_block_kernel(w_ptr, u_ptr, s_ptr, z_ptr, codes_ptr, err_ptr, N, B,
                           stride_w, stride_u, stride_s, stride_c, stride_e, lo, hi,
                           HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                           ROUND: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_B)
        r_ok = rows < N
        c_ok = cols < B
        ok = r_ok[:, None] & c_ok[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=ok, other=0.0)
        codes = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
        errs = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
        for i in range(0, B):
            here = (cols == i)[None, :]
            wi = tl.sum(tl.where(here, w, 0.0), axis=1)  # column i: one non-zero term, exact
            si = tl.load(s_ptr + rows * stride_s + i, mask=r_ok, other=1.0)
            c = (tl.math.div_rn(wi, si) + ROUND) - ROUND
            if HAS_ZERO:
                zi = tl.load(z_ptr + rows * stride_s + i, mask=r_ok, other=0.0)
                c = c + zi
            c = tl.minimum(tl.maximum(c, lo), hi)
            if HAS_ZERO:
                q = (c - zi) * si
            else:
                q = c * si
            u_row = tl.load(u_ptr + i * stride_u + cols, mask=c_ok & (cols >= i), other=0.0)
            u_ii = tl.load(u_ptr + i * stride_u + i)
            e = tl.math.div_rn(wi - q, u_ii)
            w = w - e[:, None] * u_row[None, :]
            codes = tl.where(here, c[:, None], codes)
            errs = tl.where(here, e[:, None], errs)
        tl.store(codes_ptr + rows[:, None] * stride_c + cols[None, :], codes, mask=ok)
        tl.store(err_ptr + rows[:, None] * stride_e + cols[None, :], errs, mask=ok)

    return _gptq_block_kernel


_KERNEL = None


def sweep_block(W1: torch.Tensor, U1: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
                lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sweep_block_reference`` as one Triton launch (compiled on CUDA, the interpreter on the CPU).

    Same arguments and results, except that ``W1`` is read, not updated (the caller discards it).
    Raises LowbitError for blocks wider than 256 columns (the register tile) or non-fp32 inputs.
    """
    global _KERNEL
    import triton

    N, B = W1.shape
    if B > 256 or U1.shape != (B, B) or s.shape != (N, B) or (z is not None and z.shape != (N, B)):
        raise LowbitError(f"sweep_block needs W1 (N, B <= 256), U1 (B, B), s and z (N, B); got {tuple(W1.shape)}, "
                          f"{tuple(U1.shape)}, {tuple(s.shape)}, {None if z is None else tuple(z.shape)}")
    if any(t.dtype != torch.float32 for t in (W1, U1, s) + (() if z is None else (z,))):
        raise LowbitError("sweep_block takes fp32 tensors")
    if _KERNEL is None:
        _KERNEL = _kernel()
    W1, U1, s = W1.contiguous(), U1.contiguous(), s.contiguous()
    z = s if z is None else z.contiguous()  # a placeholder pointer when symmetric
    codes = torch.empty_like(W1)
    errs = torch.empty_like(W1)
    grid = (triton.cdiv(N, _BLOCK_N),)
    _KERNEL[grid](W1, U1, s, z, codes, errs, N, B, W1.stride(0), U1.stride(0), s.stride(0), codes.stride(0),
                  errs.stride(0), float(lo), float(hi), HAS_ZERO=z is not s, BLOCK_N=_BLOCK_N,
                  BLOCK_B=triton.next_power_of_2(B), ROUND=_ROUND, num_warps=4, enable_fp_fusion=False)
    return codes, errs
