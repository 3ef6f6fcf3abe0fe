"""W4A16 GEMM in Triton: y = x @ W^T (+ bias), W int4 with fp16 scales, x fp16 or bf16.

Reads ``PackedInt4`` (``lowbit.kernels.layout``): one loop step is one packed tile of 128 K
columns, 64 bytes per weight row, whose low nibbles are columns 0..63 and high nibbles 64..127. Each
half becomes a (BLOCK_N, 64) operand in the activation dtype with one bit operation and one
subtraction, both exact: ``u | 0x6400`` read as fp16 is 1024 + u (0x4300 in bf16 is 128 + u), minus
(1024 + zero) gives u - zero. No integer-to-float conversion instruction (a quarter-rate unit on
Hopper) and no shuffle.

Scales, by group size:
- per channel: codes go into the MMA as is, the scale multiplies the fp32 accumulator once at the end;
- group 128 or 256 (one scale per tile and row): the tile's two MMAs go into a fresh fp32 partial
  that is scaled and added to the accumulator, so no per-weight multiply either;
- group 32 or 64: the operand is scaled per column before the MMA (rounded to the activation dtype).

Orientation (``TileConfig.swap``): at small M the kernel computes (W @ x^T)^T, so the weight tile
fills the MMA's 64-row side and the few activation rows its 16-wide side. Split-K
(``lowbit.kernels.splitk``) spreads the K loop of few output tiles over all SMs.

Numerics: ``lowbit.kernels.reference.w4a16_reference`` (fp32). Products are exact in the MMA
(u - zero is an integer below 16) and accumulate in fp32; the scale is applied in fp32.
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
from lowbit.kernels.unpack import USE_ASM, nibbles_float

# lowbit.kernels.unpack turns a nibble u into BASE + u in the activation dtype (exact: u < 16)
_MAGIC = {torch.float16: {"IS_FP16": True, "BASE": 1024.0}, torch.bfloat16: {"IS_FP16": False, "BASE": 128.0}}


@triton.jit
def load_x_halves(x_row, k0, K, rj, HALF_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The activations for one packed tile: columns k0 + rj and k0 + HALF_K + rj (zeros past K)."""
    if EVEN_K:
        x_lo = tl.load(x_row + k0)
        x_hi = tl.load(x_row + k0 + HALF_K)
    else:
        x_lo = tl.load(x_row + k0, mask=k0 + rj[None, :] < K, other=0.0)
        x_hi = tl.load(x_row + k0 + HALF_K, mask=k0 + HALF_K + rj[None, :] < K, other=0.0)
    return x_lo, x_hi


@triton.jit
def _w4a16_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, n_tiles, group_size,
    stride_xm, stride_wn, stride_ym,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_MODE: tl.constexpr,  # 0 per channel, 1 one group per tile half, 2 per column (scale_mode)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr,
    HALF_K: tl.constexpr, IS_FP16: tl.constexpr, BASE: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT = x_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF_K)
    n_ok = rn < N
    # Loads use clamped rows instead of masks (rows past M or N repeat the last one and are never
    # stored): ncu showed this kernel issue-bound, with mask arithmetic a large share of the loop.
    rn_ld = tl.minimum(rn, N - 1)
    w_row = w_ptr + rn_ld[:, None] * stride_wn + rj[None, :]
    x_row = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm + rj[None, :]
    wait(PDL)  # PDL (lowbit.kernels.pdl): the kernel before this one has completed
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # zero point of the current group per row, as (BLOCK_N, 1) in DT; symmetric: the constant 8
    off = tl.full((BLOCK_N, 1), BASE + 8.0, DT)
    if HAS_ZEROS and SCALE_MODE == 0:
        off = (tl.load(z_ptr + rn_ld).to(tl.float32) + BASE).to(DT)[:, None]
    last_group = (K - 1) // group_size
    for t in range(pid_k, n_tiles, SPLIT_K):
        k0 = t * (2 * HALF_K)
        b = tl.load(w_row + t * HALF_K)  # K is padded to whole tiles in PackedInt4
        x_lo, x_hi = load_x_halves(x_row, k0, K, rj, HALF_K, EVEN_K)
        if SCALE_MODE == 2:
            # group 32 / 64: a scale (and zero) per column, applied to the operand; padding columns
            # (their x is 0) borrow the last group
            g_lo = tl.minimum((k0 + rj) // group_size, last_group)
            g_hi = tl.minimum((k0 + HALF_K + rj) // group_size, last_group)
            s_lo = tl.load(s_ptr + g_lo[None, :] * N + rn_ld[:, None])
            s_hi = tl.load(s_ptr + g_hi[None, :] * N + rn_ld[:, None])
            if HAS_ZEROS:
                z_lo = tl.load(z_ptr + g_lo[None, :] * N + rn_ld[:, None])
                z_hi = tl.load(z_ptr + g_hi[None, :] * N + rn_ld[:, None])
                w_lo = (nibbles_float(b, False, IS_FP16, ASM) - (z_lo.to(tl.float32) + BASE).to(DT)) * s_lo.to(DT)
                w_hi = (nibbles_float(b, True, IS_FP16, ASM) - (z_hi.to(tl.float32) + BASE).to(DT)) * s_hi.to(DT)
            else:
                w_lo = (nibbles_float(b, False, IS_FP16, ASM) - off) * s_lo.to(DT)
                w_hi = (nibbles_float(b, True, IS_FP16, ASM) - off) * s_hi.to(DT)
        else:
            if HAS_ZEROS and SCALE_MODE == 1:  # each half lies in one group
                z_lo = tl.load(z_ptr + (k0 // group_size) * N + rn_ld)
                z_hi = tl.load(z_ptr + tl.minimum((k0 + HALF_K) // group_size, last_group) * N + rn_ld)
                w_lo = nibbles_float(b, False, IS_FP16, ASM) - (z_lo.to(tl.float32) + BASE).to(DT)[:, None]
                w_hi = nibbles_float(b, True, IS_FP16, ASM) - (z_hi.to(tl.float32) + BASE).to(DT)[:, None]
            else:
                w_lo = nibbles_float(b, False, IS_FP16, ASM) - off
                w_hi = nibbles_float(b, True, IS_FP16, ASM) - off
        if SCALE_MODE == 1:
            # one group per half: each half's MMA into a fresh fp32 partial, scaled, then accumulated
            s_lo = tl.load(s_ptr + (k0 // group_size) * N + rn_ld).to(tl.float32)
            s_hi = tl.load(s_ptr + tl.minimum((k0 + HALF_K) // group_size, last_group) * N + rn_ld).to(tl.float32)
            if SWAP:
                acc += tl.dot(w_lo, tl.trans(x_lo)) * s_lo[:, None] + tl.dot(w_hi, tl.trans(x_hi)) * s_hi[:, None]
            else:
                acc += tl.dot(x_lo, tl.trans(w_lo)) * s_lo[None, :] + tl.dot(x_hi, tl.trans(w_hi)) * s_hi[None, :]
        else:
            if SWAP:
                acc = tl.dot(w_lo, tl.trans(x_lo), acc)
                acc = tl.dot(w_hi, tl.trans(x_hi), acc)
            else:
                acc = tl.dot(x_lo, tl.trans(w_lo), acc)
                acc = tl.dot(x_hi, tl.trans(w_hi), acc)
    if SWAP:
        acc = tl.trans(acc)  # (BLOCK_M, BLOCK_N)
    if SCALE_MODE == 0:
        acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    store_tile(acc, rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, stride_ym, HAS_BIAS, SPLIT_K)


_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8", torch.float8_e4m3fn: "float8_e4m3fn"}


def check_activation(x: torch.Tensor, K: int, dtypes: tuple[torch.dtype, ...], op: str) -> None:
    """Raise a LowbitError unless x is a 2-D (M, K) tensor of one of ``dtypes``."""
    if x.dtype not in dtypes:
        raise LowbitError(f"{op} takes {' or '.join(_SHORT[d] for d in dtypes)} activations, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != K:
        raise LowbitError(f"{op}: x must be (M, {K}), got {tuple(x.shape)}")


def scale_mode(group_size: int | None, half: int) -> int:
    """0: per channel; 1: a group per tile half (group a multiple of the half); 2: per column."""
    if group_size is None:
        return 0
    return 1 if group_size % half == 0 else 2


def w4a16_matmul(
    x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None = None, config: TileConfig | None = None
) -> torch.Tensor:
    """x (M, K) fp16 or bf16 -> (M, N) in x's dtype; ``w`` from ``pack_for_kernels``; bias (N,) or None."""
    check_activation(x, w.K, (torch.float16, torch.bfloat16), "w4a16")
    cfg = config or TileConfig()
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    x = x.contiguous()
    M, N = x.shape[0], w.N
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    pdl = launch_options(x.device)
    grid = (cdiv(M, cfg.block_m), cdiv(N, cfg.block_n), cfg.split_k)
    ws, locks = reserve(x.device, M * N if cfg.split_k > 1 else 0, grid[0] * grid[1] if cfg.split_k > 1 else 0)
    triton_launch(_w4a16_kernel, grid,
        x, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales,
        bias if bias is not None else w.scales, y, ws, locks,
        M, N, w.K, w.Kp // w.tile_k, w.group_size or w.K,
        x.stride(0), w.qweight.stride(0), y.stride(0),
        HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None, SCALE_MODE=scale_mode(w.group_size, w.half),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, SWAP=cfg.swap, HALF_K=w.half,
        **_MAGIC[x.dtype], ASM=USE_ASM, EVEN_K=w.K % w.tile_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl,
    )
    return y
