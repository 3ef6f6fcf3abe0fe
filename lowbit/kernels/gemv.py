"""W4A8 for one to four activation rows without tensor cores: ``dp4a`` dot products (a GEMV).

At batch 1 a decode step's GEMMs are pure weight streaming: 0.5 byte per int4 weight, two integer
MACs per byte. The tensor-core kernel (``lowbit.kernels.w4a8``) pads the one activation row to the
MMA's 16 (15/16 of the MMA wasted, which is free), but it also moves every weight tile through
shared memory into the MMA operand layout, and its per-tile instruction stream kept it at 1.0-2.1 TB/s
on the Llama-3-8B layers at M=1 on the H100 (docs/kernels.md), against ~2.9 TB/s for cuBLAS fp16.

Here each thread keeps the 32-bit words it loaded and never shares them:
- a word of the kernel layout (``lowbit.kernels.layout``: byte j of a packed tile holds column j of
  the tile's first half in its low nibble and column j of its second half in its high nibble) is two
  groups of four consecutive columns: ``word & 0x0F0F0F0F`` and ``(word >> 4) & 0x0F0F0F0F`` are four
  unsigned int8 codes each;
- ``dp4a.u32.s32`` multiplies those four codes by four int8 activations (one 32-bit word of x) and adds
  them into an int32: two AND, one shift and two ``dp4a`` for eight weights;
- the zero point comes out once per row, as in the tensor-core kernel: x . (u - z) = x . u - z * sum(x),
  with sum(x) from ``dp4a`` against 0x01010101.
Integer products and sums are exact, so the result equals ``w4a8_reference`` up to the fp32 epilogue
(both scales), the same numerics as the tensor-core kernel.

Limits (``gemv_takes``): int8 activations (not fp8), per-channel weights, M <= ``GEMV_MAX_M``,
K a multiple of 4 (x is read as 32-bit words). The dispatch table decides where it is faster.
Under ``TRITON_INTERPRET`` (CI) ``dp4a`` is spelled out byte by byte (``ASM=False``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.device import sm_count
from lowbit.errors import LowbitError
from lowbit.kernels.config import TileConfig
from lowbit.kernels.launch import cdiv, next_power_of_2, triton_launch
from lowbit.kernels.layout import PackedInt4
from lowbit.kernels.pdl import launch_options, wait
from lowbit.kernels.splitk import reserve, store_tile
from lowbit.kernels.unpack import USE_ASM
from lowbit.kernels.w4a16 import check_activation

GEMV_MAX_M = 4  # rows per program: the weights are loaded once and dotted with each row
# weight codes unsigned (0..15) times signed int8 activations; and signed times signed (for sum(x))
_DP4A_US = tl.constexpr("dp4a.u32.s32 $0, $1, $2, $3;")
_DP4A_SS = tl.constexpr("dp4a.s32.s32 $0, $1, $2, $3;")


@triton.jit
def dot4(a, b, c, A_SIGNED: tl.constexpr, ASM: tl.constexpr):
    """c + sum over the 4 bytes i of a.byte[i] * b.byte[i] (int32 tensors of one shape; b's bytes signed,
    a's unsigned unless ``A_SIGNED``): PTX ``dp4a``, or the same sum spelled out."""
    if ASM:
        if A_SIGNED:
            out = tl.inline_asm_elementwise(_DP4A_SS, "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise(_DP4A_US, "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = c
        for i in tl.static_range(4):
            if A_SIGNED:
                ai = (a << (24 - 8 * i)) >> 24
            else:
                ai = (a >> (8 * i)) & 0xFF
            out += ai * ((b << (24 - 8 * i)) >> 24)
    return out


@triton.jit
def _w4a8_gemv_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, XW, KW, n_steps,
    stride_xm, stride_wn, stride_ym,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
    HALF_W: tl.constexpr, AHEAD: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = False,
):
    # x_ptr: (M, XW) int32 words of int8 activations; w_ptr: (N, KW) int32 words of the packed tiles.
    # HALF_W: words per half tile (tile_k / 8), the distance between a low-nibble word's activations
    # and its high-nibble word's.
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.arange(0, BLOCK_W)
    # clamped rows instead of load masks (as in lowbit.kernels.w4a16): rows past M, N are not stored
    w_row = w_ptr + tl.minimum(rn, N - 1)[:, None] * stride_wn
    x_row = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm
    ones = tl.full((BLOCK_M, BLOCK_W), 0x01010101, tl.int32)
    # The weights are constants that no earlier kernel writes, so the first steps' words are loaded
    # before the PDL wait: under PDL this program is resident while the kernel before it (a norm, the
    # attention) still runs, and the first DRAM round trips overlap it. Then each step loads the words
    # AHEAD steps on before it computes (register buffers, more bytes in flight per program). Measured
    # on the H100 at M=1 (docs/kernels.md): two steps ahead helped only the 8B down projection (16.8 ->
    # 15.7 us); qkv, o and gate+up were 0.1-1 us slower than one step ahead, so the tables decide.
    c = pid_k * BLOCK_W + rc
    w = tl.load(w_row + c[None, :], mask=(c < KW)[None, :], other=0)
    if AHEAD >= 2:
        c = c + SPLIT_K * BLOCK_W
        w1 = tl.load(w_row + c[None, :], mask=(c < KW)[None, :], other=0)
    if AHEAD >= 3:
        c = c + SPLIT_K * BLOCK_W
        w2 = tl.load(w_row + c[None, :], mask=(c < KW)[None, :], other=0)
    wait(PDL)  # PDL (lowbit.kernels.pdl): the kernel before this one has completed
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.int32)
    xsum = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.int32)
    for s in range(pid_k, n_steps, SPLIT_K):
        c = s * BLOCK_W + rc  # word of each weight row
        cn = c + AHEAD * SPLIT_K * BLOCK_W  # the step AHEAD on: all masked off near the end
        w_next = tl.load(w_row + cn[None, :], mask=(cn < KW)[None, :], other=0)
        xl = (c // HALF_W) * (2 * HALF_W) + c % HALF_W  # the activation word its low nibbles meet
        # padding columns past K hold code `zero` and meet x = 0 here: they add nothing
        x_lo = tl.load(x_row + xl[None, :], mask=(xl < XW)[None, :], other=0)
        x_hi = tl.load(x_row + (xl + HALF_W)[None, :], mask=(xl + HALF_W < XW)[None, :], other=0)
        lo = (w & 0x0F0F0F0F)[None, :, :]
        hi = ((w >> 4) & 0x0F0F0F0F)[None, :, :]
        acc = dot4(tl.broadcast_to(lo, (BLOCK_M, BLOCK_N, BLOCK_W)),
                   tl.broadcast_to(x_lo[:, None, :], (BLOCK_M, BLOCK_N, BLOCK_W)), acc, False, ASM)
        acc = dot4(tl.broadcast_to(hi, (BLOCK_M, BLOCK_N, BLOCK_W)),
                   tl.broadcast_to(x_hi[:, None, :], (BLOCK_M, BLOCK_N, BLOCK_W)), acc, False, ASM)
        xsum = dot4(ones, x_lo, xsum, True, ASM)
        xsum = dot4(ones, x_hi, xsum, True, ASM)
        if AHEAD == 1:
            w = w_next
        elif AHEAD == 2:
            w = w1
            w1 = w_next
        else:
            w = w1
            w1 = w2
            w2 = w_next
    n_ok = rn < N
    if HAS_ZEROS:
        z = tl.load(z_ptr + rn, mask=n_ok, other=0).to(tl.int32)
    else:
        z = tl.full((BLOCK_N,), 8, tl.int32)
    # exact int32: x . u - z * sum(x) over this program's share of K
    dot = tl.sum(acc, axis=2) - tl.sum(xsum, axis=1)[:, None] * z[None, :]
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    out_f = dot.to(tl.float32) * scale[None, :] * xs[:, None]
    store_tile(out_f, rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, stride_ym, HAS_BIAS, SPLIT_K)


def gemv_takes(xq: torch.Tensor, w: PackedInt4) -> bool:
    """Whether ``w4a8_gemv`` runs this product (module docstring: Limits)."""
    return (xq.dtype == torch.int8 and xq.ndim == 2 and 1 <= xq.shape[0] <= GEMV_MAX_M
            and w.group_size is None and w.perm is None and w.K % 4 == 0)


def default_gemv_config(N: int, K: int, sms: int) -> TileConfig:
    """The launch the H100 and H200 tables pick for most Llama shapes at M=1 (16 weight rows x 1024
    columns per step: 512 contiguous bytes per row, 16 words per thread), split-K only when there are
    fewer 16-row blocks than SMs."""
    block_n, block_k = 16, 1024
    tiles = cdiv(N, block_n)
    split = max(1, min(cdiv(K, block_k), cdiv(sms, tiles)))
    return TileConfig(block_m=16, block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=1)


def w4a8_gemv(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: PackedInt4,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """xq (M, K) int8 with M <= GEMV_MAX_M, x_scale (M,) fp32, ``w`` per-channel ``PackedInt4`` ->
    (M, N) ``out_dtype``. ``config``: block_n weight rows per program, block_k columns per loop step
    (a multiple of 32), split_k programs per row block, num_warps, num_stages: loop steps of weights
    loaded ahead into registers (1-3); block_m is unused."""
    check_activation(xq, w.K, (torch.int8,), "w4a8 gemv")
    if not gemv_takes(xq, w):
        raise LowbitError(
            f"w4a8 gemv takes 1..{GEMV_MAX_M} rows, per-channel weights without act-order, and K a multiple "
            f"of 4; got M={xq.shape[0]}, group {w.group_size}, perm {w.perm is not None}, K={w.K} "
            "(use lowbit.kernels.w4a8.w4a8_matmul)")
    if x_scale.shape != (xq.shape[0],) or x_scale.dtype != torch.float32:
        raise LowbitError(f"w4a8 gemv: x_scale must be fp32 ({xq.shape[0]},), got {x_scale.dtype} "
                          f"{tuple(x_scale.shape)}")
    M, N = xq.shape[0], w.N
    cfg = config or default_gemv_config(N, w.K, sm_count(xq.device, 8))
    if cfg.block_k % 32 or not 1 <= cfg.num_stages <= 3:
        raise LowbitError(f"w4a8 gemv: block_k must be a multiple of 32 and num_stages (steps loaded ahead) 1-3, "
                          f"got {cfg.block_k} and {cfg.num_stages}")
    # 32-bit views: 4 activations per word (K % 4 == 0), 8 packed weights per word (rows of Kp / 2 bytes)
    x32 = xq.contiguous().view(torch.int32)
    w32 = w.qweight.view(torch.int32)
    block_w = cfg.block_k // 8
    n_steps = cdiv(w32.shape[1], block_w)
    split = min(cfg.split_k, n_steps)
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    grid = (1, cdiv(N, cfg.block_n), split)
    ws, locks = reserve(xq.device, M * N if split > 1 else 0, grid[1] if split > 1 else 0)
    triton_launch(_w4a8_gemv_kernel, grid,
        x32, x_scale, w32, w.scales, w.zeros if w.zeros is not None else w.scales,
        bias if bias is not None else w.scales, y, ws, locks,
        M, N, x32.shape[1], w32.shape[1], n_steps,
        x32.stride(0), w32.stride(0), y.stride(0),
        HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=next_power_of_2(M), BLOCK_N=cfg.block_n, BLOCK_W=block_w, SPLIT_K=split,
        HALF_W=w.half // 4, AHEAD=cfg.num_stages, ASM=USE_ASM, num_warps=cfg.num_warps, num_stages=1,
        **launch_options(xq.device),
    )
    return y
