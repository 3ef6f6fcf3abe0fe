"""W4A16 for one to four activation rows on the CUDA cores, reading ``FragmentInt4`` (a GEMV; issue 18).

At batch 1 a decode GEMM only streams its weights (0.5 byte per int4 weight). The wgmma kernel
(``lowbit.kernels.mixed_wgmma``) pads the row to 16 for the tensor cores and moves every tile through
shared memory; on the H200 at M = 1 it streamed 1.1-2.0 TB/s (docs/kernels.md), below Marlin. Here,
as in the W4A8 GEMV (``lowbit.kernels.gemv``), each thread keeps the 32-bit words it loads:

- The weights are in the wgmma kernel's fragment order (``FragmentInt4``, fp16 variant), so the
  layer keeps one int4 layout for every M. A (16-row group, 128-column tile) block is 256 words; word
  w holds 4 bytes, of rows r and r + 8 (r = w >> 5) and byte columns j and j + 1, with j given by the
  low five bits of w (``FRAG_BASES``: 8, 16, 32, 2, 4). Byte j holds column j in its low nibble and
  column j + 64 in its high one. So thread t of a block's 256 reads word t: a warp reads 128
  contiguous bytes, and all of a word's 8 weights share the thread's 4 activations x[j], x[j + 1],
  x[j + 64], x[j + 65].
- Each nibble becomes an fp32 number with no conversion instruction: ``nibble | 0x4B000000`` read as
  fp32 is 2^23 + u, and subtracting 2^23 + zero gives u - zero exactly. Then one fp32 FMA per weight
  and activation row, and the group scale once per (row, tile): fp32 throughout, as the reference.
- The 32 threads of a warp share their rows; their sums meet in one reduction at the end.

Limits (``frag_gemv_takes``): M <= ``FRAG_GEMV_MAX_M``, groups of a multiple of 64 columns or per
channel (FragmentInt4's own). Under ``TRITON_INTERPRET`` (CI) it runs as written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.device import sm_count
from lowbit.errors import LowbitError
from lowbit.kernels.config import TileConfig
from lowbit.kernels.launch import cdiv, next_power_of_2, triton_launch
from lowbit.kernels.layout import FragmentInt4
from lowbit.kernels.pdl import launch_options, wait
from lowbit.kernels.splitk import reserve, store_tile
from lowbit.kernels.w4a16 import check_activation

FRAG_GEMV_MAX_M = 4  # activation rows per program: the weights are unpacked once for all of them
_MAGIC = 8388608.0  # 2^23: the fp32 with bit pattern 0x4B000000


@triton.jit
def _nib(wv, SHIFT: tl.constexpr):
    """Nibble at bit SHIFT of each int32 word as the fp32 number 2^23 + nibble (exact, no cvt)."""
    return (((wv >> SHIFT) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _scale_zero(s_ptr, z_ptr, g, n, N, HAS_ZEROS: tl.constexpr):
    """Scales (fp32) and 2^23 + zero points of scale group g for output rows n (any shape)."""
    s = tl.load(s_ptr + g * N + n).to(tl.float32)
    if HAS_ZEROS:
        zc = tl.load(z_ptr + g * N + n).to(tl.float32) + 8388608.0
    else:
        zc = tl.full(n.shape, 8388616.0, tl.float32)  # symmetric: zero 8
    return s, zc


@triton.jit
def _w4a16_frag_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, n_groups16, tiles_per_split, group_size, stride_xm, stride_wg, stride_ym,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, G: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr = False,
):
    # w_ptr: (n_groups16, n_tiles * 256) int32 words of FragmentInt4; SCALE_MODE 0 per channel,
    # 1 one group per tile (groups of a multiple of 128 columns), 2 one per tile half (of 64)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = tl.arange(0, BLOCK_M)
    gi = pid_n * G + tl.arange(0, G)
    wd = tl.arange(0, 256)
    # byte column j of each word (its low five bits: FRAG_BASES) and its rows r, r + 8
    j = (wd & 1) * 8 + ((wd >> 1) & 1) * 16 + ((wd >> 2) & 1) * 32 + ((wd >> 3) & 1) * 2 + ((wd >> 4) & 1) * 4
    n_a = gi[:, None] * 16 + (wd >> 5)[None, :]  # (G, 256) output row of bytes 0-1; bytes 2-3: n_a + 8
    n_a_ld = tl.minimum(n_a, N - 1)
    n_b_ld = tl.minimum(n_a + 8, N - 1)
    w_row = w_ptr + tl.minimum(gi, n_groups16 - 1)[:, None] * stride_wg + wd[None, :]
    x_row = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm
    last_group = (K - 1) // group_size
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, stride_wg // 256)
    if SCALE_MODE == 0:  # per channel: zeros now, scales at the end
        s_a, zc_a = _scale_zero(s_ptr, z_ptr, 0, n_a_ld, N, HAS_ZEROS)
        s_b, zc_b = _scale_zero(s_ptr, z_ptr, 0, n_b_ld, N, HAS_ZEROS)
    wait(PDL)  # PDL (lowbit.kernels.pdl): the kernel before this one has completed
    acc_a = tl.zeros((BLOCK_M, G, 256), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, G, 256), dtype=tl.float32)
    for t in range(t0, t1):
        wv = tl.load(w_row + t * 256)  # (G, 256) int32
        k = t * 128 + j
        # columns past K: x = 0 (their codes decode to 0 too)
        x0 = tl.load(x_row + k[None, :], mask=(k < K)[None, :], other=0.0).to(tl.float32)[:, None, :]
        x1 = tl.load(x_row + k[None, :] + 1, mask=(k + 1 < K)[None, :], other=0.0).to(tl.float32)[:, None, :]
        x2 = tl.load(x_row + k[None, :] + 64, mask=(k + 64 < K)[None, :], other=0.0).to(tl.float32)[:, None, :]
        x3 = tl.load(x_row + k[None, :] + 65, mask=(k + 65 < K)[None, :], other=0.0).to(tl.float32)[:, None, :]
        # padding tiles past K borrow the last group (their x is 0)
        g_lo = tl.minimum((t * 128) // group_size, last_group)
        if SCALE_MODE == 1:
            s_a, zc_a = _scale_zero(s_ptr, z_ptr, g_lo, n_a_ld, N, HAS_ZEROS)
            s_b, zc_b = _scale_zero(s_ptr, z_ptr, g_lo, n_b_ld, N, HAS_ZEROS)
        if SCALE_MODE == 2:  # the low nibbles (columns j, j + 1) and the high ones in two groups
            g_hi = tl.minimum((t * 128 + 64) // group_size, last_group)
            s_a, zc_a = _scale_zero(s_ptr, z_ptr, g_lo, n_a_ld, N, HAS_ZEROS)
            s_b, zc_b = _scale_zero(s_ptr, z_ptr, g_lo, n_b_ld, N, HAS_ZEROS)
            s_ah, zc_ah = _scale_zero(s_ptr, z_ptr, g_hi, n_a_ld, N, HAS_ZEROS)
            s_bh, zc_bh = _scale_zero(s_ptr, z_ptr, g_hi, n_b_ld, N, HAS_ZEROS)
        else:
            s_ah, zc_ah, s_bh, zc_bh = s_a, zc_a, s_b, zc_b
        # byte 0: (r, j), byte 1: (r, j + 1), byte 2: (r + 8, j), byte 3: (r + 8, j + 1); low nibble
        # column j, high nibble j + 64
        lo_a = (_nib(wv, 0) - zc_a)[None] * x0 + (_nib(wv, 8) - zc_a)[None] * x1
        hi_a = (_nib(wv, 4) - zc_ah)[None] * x2 + (_nib(wv, 12) - zc_ah)[None] * x3
        lo_b = (_nib(wv, 16) - zc_b)[None] * x0 + (_nib(wv, 24) - zc_b)[None] * x1
        hi_b = (_nib(wv, 20) - zc_bh)[None] * x2 + (_nib(wv, 28) - zc_bh)[None] * x3
        if SCALE_MODE == 0:
            acc_a += lo_a + hi_a
            acc_b += lo_b + hi_b
        else:
            acc_a += s_a[None] * lo_a + s_ah[None] * hi_a
            acc_b += s_b[None] * lo_b + s_bh[None] * hi_b
    if SCALE_MODE == 0:
        acc_a = acc_a * s_a[None]
        acc_b = acc_b * s_b[None]
    # the 32 words of a row pair (one warp's) meet: (BM, G, 8 rows) for r and for r + 8
    out_a = tl.sum(tl.reshape(acc_a, (BLOCK_M, G, 8, 32)), axis=3)
    out_b = tl.sum(tl.reshape(acc_b, (BLOCK_M, G, 8, 32)), axis=3)
    out = tl.reshape(tl.permute(tl.join(out_a, out_b), (0, 1, 3, 2)), (BLOCK_M, G * 16))  # row 16g + 8h + r
    rn = pid_n * G * 16 + tl.arange(0, G * 16)
    store_tile(out, rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, stride_ym, HAS_BIAS, SPLIT_K)


def frag_gemv_takes(x: torch.Tensor, w: FragmentInt4) -> bool:
    """Whether ``w4a16_frag_gemv`` runs this product (module docstring: Limits)."""
    return (isinstance(w, FragmentInt4) and not w.int8 and x.ndim == 2 and 1 <= x.shape[0] <= FRAG_GEMV_MAX_M
            and (w.group_size is None or w.group_size % 64 == 0))


def default_frag_gemv_config(N: int, K: int, sms: int) -> TileConfig:
    """4 row groups (64 rows) per program, split-K to about two programs per SM, at least 4 tiles each."""
    programs = cdiv(N, 64)
    split = max(1, min(cdiv(K, 128) // 4, cdiv(2 * sms, programs)))
    return TileConfig(block_m=16, block_n=64, block_k=128, split_k=split, num_warps=8, num_stages=1)


def w4a16_frag_gemv(x: torch.Tensor, w: FragmentInt4, bias: torch.Tensor | None = None,
                    config: TileConfig | None = None) -> torch.Tensor:
    """x (M, K) fp16 or bf16 with M <= FRAG_GEMV_MAX_M, ``w`` a FragmentInt4 (fp16 order) -> (M, N) in
    x's dtype; bias (N,) or None. ``config``: block_n weight rows per program (a power of two >= 16),
    split_k programs per row block, num_warps (the 256 words of a block need 8 warps to be one word
    per thread); block_m, block_k and num_stages are unused."""
    check_activation(x, w.K, (torch.float16, torch.bfloat16), "w4a16 fragment gemv")
    if not frag_gemv_takes(x, w):
        raise LowbitError(
            f"the w4a16 fragment gemv takes 1..{FRAG_GEMV_MAX_M} rows and a FragmentInt4 of the fp16 order with "
            f"groups of a multiple of 64 columns; got M={x.shape[0]}, int8 order {getattr(w, 'int8', None)}, "
            f"group {getattr(w, 'group_size', None)} (use w4a16_mixed_wgmma)")
    M, N = x.shape[0], w.N
    cfg = config or default_frag_gemv_config(N, w.K, sm_count(x.device, 8))
    G = cfg.block_n // 16  # TileConfig holds block_n to a power of two >= 16
    x = x.contiguous()
    w32 = w.qweight.view(torch.int32)  # (N16, n_tiles * 256)
    n_tiles = w32.shape[1] // 256
    per = cdiv(n_tiles, max(1, min(cfg.split_k, n_tiles)))
    split = cdiv(n_tiles, per)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (1, cdiv(N, cfg.block_n), split)
    ws, locks = reserve(x.device, M * N if split > 1 else 0, grid[1] if split > 1 else 0)
    mode = 0 if w.group_size is None else 1 if w.group_size % 128 == 0 else 2
    triton_launch(
        _w4a16_frag_gemv_kernel, grid,
        x, w32, w.scales, w.zeros if w.zeros is not None else w.scales, bias if bias is not None else w.scales,
        y, ws, locks,
        M, N, w.K, w32.shape[0], per, w.group_size or w.K, x.stride(0), w32.stride(0), y.stride(0),
        HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None, SCALE_MODE=mode,
        BLOCK_M=next_power_of_2(M), G=G, SPLIT_K=split, num_warps=cfg.num_warps, num_stages=1,
        **launch_options(x.device),
    )
    return y
