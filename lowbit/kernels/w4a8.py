"""W4A8 GEMM in Triton ("FastGEMM", OdysseyLLM): int4 weights widened in registers, 8-bit tensor cores.

y = (xq @ (u - zero)^T) * x_scale[m] * w_scale[n] (+ bias), with xq the per-token quantized
activations (``lowbit.kernels.act_quant``) and W in ``PackedInt4`` (``lowbit.kernels.layout``).
Hopper has no int4 MMA (``mma.sync`` s4 runs at 52 TOPS, emulated; s8 at ~1200: ../shared/PERF.md),
so the weights are widened to 8 bits and the MMA is an 8-bit one. Two variants:

- ``int8``: the unsigned nibble ``u`` (0..15) *is* a valid int8 operand, so widening is one AND (or
  one shift) per byte. The zero point comes out of the MMA instead of each weight:
  ``x . (u - z) = x . u - z * sum(x)``, with ``sum(x)`` the tile's row sums of the int8 activations
  (cheap: BLOCK_M x 128 adds per tile against BLOCK_M x BLOCK_N x 128 MACs). Products and sums are
  exact in int32. Per channel: int32 accumulation over all of K and both scales in the epilogue;
  group 128/256: each tile's int32 partial is scaled by its group's fp16 scale into an fp32
  accumulator (the two-level scheme: integer inside a group, float across groups).
- ``fp8``: activations in fp8 e4m3 (per-token scale absmax / 448) and (u - z) converted to fp8
  through fp16 (exact: e4m3 holds every integer up to 16), FP8 tensor cores, fp32 accumulation.

Numerics: ``lowbit.kernels.reference.w4a8_reference`` (fp32 math on the same codes). The int8
variant is exact up to the fp32 epilogue; the fp8 variant to fp32 accumulation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels.config import TileConfig
from lowbit.kernels.launch import cdiv, triton_launch
from lowbit.kernels.layout import PackedInt4
from lowbit.kernels.pdl import launch_options, wait
from lowbit.kernels.splitk import reserve, store_tile
from lowbit.kernels.unpack import USE_ASM, nibbles_float, nibbles_int8
from lowbit.kernels.w4a16 import check_activation, load_x_halves


@triton.jit
def _mma(w, x, acc, SWAP: tl.constexpr, OUT: tl.constexpr):
    """acc + x @ w^T, as (M, N) or, swapped, as (N, M) = w @ x^T."""
    if SWAP:
        out = tl.dot(w, tl.trans(x), acc, out_dtype=OUT)
    else:
        out = tl.dot(x, tl.trans(w), acc, out_dtype=OUT)
    return out


@triton.jit
def _outer(wvec, xvec, SWAP: tl.constexpr):
    """wvec (N,) times xvec (M,) laid out like the accumulator."""
    if SWAP:
        out = wvec[:, None] * xvec[None, :]
    else:
        out = xvec[:, None] * wvec[None, :]
    return out


@triton.jit
def _scale_w(acc, wvec, SWAP: tl.constexpr):
    """Scale the accumulator's weight-row axis by wvec (N,)."""
    if SWAP:
        out = acc * wvec[:, None]
    else:
        out = acc * wvec[None, :]
    return out


@triton.jit
def _w4a8_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, n_tiles, group_size,
    stride_xm, stride_wn, stride_ym,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, PER_TILE: tl.constexpr, FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr,
    HALF_K: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF_K)
    n_ok = rn < N
    # clamped rows instead of load masks, as in lowbit.kernels.w4a16 (rows past M, N are not stored)
    rn_ld = tl.minimum(rn, N - 1)
    w_row = w_ptr + rn_ld[:, None] * stride_wn + rj[None, :]
    x_row = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm + rj[None, :]
    wait(PDL)  # PDL (lowbit.kernels.pdl): the kernel before this one has completed
    PART_T: tl.constexpr = tl.float32 if FP8 else tl.int32  # what one MMA accumulates in
    ACC_T: tl.constexpr = tl.float32 if (FP8 or PER_TILE) else tl.int32
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC_T)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_T)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)  # int8 path, per channel: sum of x over all K
    z_lo = tl.full((BLOCK_N,), 8, tl.int32)
    if HAS_ZEROS and not PER_TILE:
        z_lo = tl.load(z_ptr + rn_ld).to(tl.int32)
    z_hi = z_lo
    last_group = (K - 1) // group_size
    for t in range(pid_k, n_tiles, SPLIT_K):
        k0 = t * (2 * HALF_K)
        b = tl.load(w_row + t * HALF_K)
        x_lo, x_hi = load_x_halves(x_row, k0, K, rj, HALF_K, EVEN_K)
        g_lo = k0 // group_size  # per group: each tile half lies in one group
        g_hi = tl.minimum((k0 + HALF_K) // group_size, last_group)
        if HAS_ZEROS and PER_TILE:
            z_lo = tl.load(z_ptr + g_lo * N + rn_ld).to(tl.int32)
            z_hi = tl.load(z_ptr + g_hi * N + rn_ld).to(tl.int32)
        if FP8:
            # (u - z) through fp16 (u | 0x6400 is 1024 + u), then to e4m3: exact for |u - z| <= 15
            w_lo = (nibbles_float(b, False, True, ASM) - (z_lo.to(tl.float32) + 1024.0).to(tl.float16)[:, None])
            w_hi = (nibbles_float(b, True, True, ASM) - (z_hi.to(tl.float32) + 1024.0).to(tl.float16)[:, None])
            w_lo = w_lo.to(tl.float8e4nv)
            w_hi = w_hi.to(tl.float8e4nv)
        else:
            w_lo = nibbles_int8(b, False, ASM)
            w_hi = nibbles_int8(b, True, ASM)
        if PER_TILE:
            # a fresh exact partial per half, zero point removed, scaled into the fp32 accumulator
            p_lo = _mma(w_lo, x_lo, tl.zeros(acc.shape, dtype=PART_T), SWAP, PART_T)
            p_hi = _mma(w_hi, x_hi, tl.zeros(acc.shape, dtype=PART_T), SWAP, PART_T)
            if not FP8:
                p_lo = p_lo - _outer(z_lo, tl.sum(x_lo.to(tl.int32), axis=1), SWAP)
                p_hi = p_hi - _outer(z_hi, tl.sum(x_hi.to(tl.int32), axis=1), SWAP)
            s_lo = tl.load(s_ptr + g_lo * N + rn_ld).to(tl.float32)
            s_hi = tl.load(s_ptr + g_hi * N + rn_ld).to(tl.float32)
            acc += _scale_w(p_lo.to(tl.float32), s_lo, SWAP) + _scale_w(p_hi.to(tl.float32), s_hi, SWAP)
        else:
            # per channel: accumulate across all of K in the MMA, zero point once at the end
            acc = _mma(w_lo, x_lo, acc, SWAP, PART_T)
            acc = _mma(w_hi, x_hi, acc, SWAP, PART_T)
            if not FP8:
                rowsum += tl.sum(x_lo.to(tl.int32), axis=1) + tl.sum(x_hi.to(tl.int32), axis=1)
    if SWAP:
        acc = tl.trans(acc)  # (BLOCK_M, BLOCK_N)
    if not FP8 and not PER_TILE:
        acc = acc - rowsum[:, None] * z_lo[None, :]  # exact int32: x . u - z * sum(x)
    out_f = acc.to(tl.float32)
    if not PER_TILE:
        out_f = out_f * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    out_f = out_f * xs[:, None]
    store_tile(out_f, rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, stride_ym, HAS_BIAS, SPLIT_K)


def w4a8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: PackedInt4,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """xq (M, K) int8 or float8_e4m3fn, x_scale (M,) fp32 -> (M, N) out_dtype (fp16 / bf16).

    ``w``: ``PackedInt4`` per channel or with a group that is a multiple of 128 (group 32/64 have
    no one-scale-per-tile form here; use ``w4a16_matmul`` on dequantized activations instead).
    """
    check_activation(xq, w.K, (torch.int8, torch.float8_e4m3fn), "w4a8")
    if w.group_size is not None and w.group_size % w.half:
        raise LowbitError(f"w4a8 kernel takes per-channel weights or groups that are multiples of {w.half}, "
                          f"got group {w.group_size}")
    if x_scale.shape != (xq.shape[0],) or x_scale.dtype != torch.float32:
        raise LowbitError(f"w4a8: x_scale must be fp32 ({xq.shape[0]},), got {x_scale.dtype} {tuple(x_scale.shape)}")
    if w.perm is not None:
        raise LowbitError("w4a8: act-order permutations must be applied before activation quantization")
    cfg = config or TileConfig()
    xq = xq.contiguous()
    M, N = xq.shape[0], w.N
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    pdl = launch_options(xq.device)
    grid = (cdiv(M, cfg.block_m), cdiv(N, cfg.block_n), cfg.split_k)
    ws, locks = reserve(xq.device, M * N if cfg.split_k > 1 else 0, grid[0] * grid[1] if cfg.split_k > 1 else 0)
    triton_launch(_w4a8_kernel, grid,
        xq, x_scale, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales,
        bias if bias is not None else w.scales, y, ws, locks,
        M, N, w.K, w.Kp // w.tile_k, w.group_size or w.K,
        xq.stride(0), w.qweight.stride(0), y.stride(0),
        HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None, PER_TILE=w.group_size is not None,
        FP8=xq.dtype == torch.float8_e4m3fn,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, SWAP=cfg.swap, HALF_K=w.half,
        ASM=USE_ASM, EVEN_K=w.K % w.tile_k == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl,
    )
    return y
