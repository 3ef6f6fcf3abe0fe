"""W4A16 for one to four activation rows on the CUDA cores, reading ``FragmentInt4`` (a GEMV; issue 18).

At batch 1 a decode GEMM only streams its weights (0.5 byte per int4 weight). The wgmma kernel
(``lowbit.kernels.mixed_wgmma``) pads the row to 16 for the tensor cores and moves every tile through
shared memory; on the H200 at M = 1 it streamed 1.1-2.0 TB/s (docs/kernels.md), below Marlin. Here,
as in the W4A8 GEMV (``lowbit.kernels.gemv``), each thread keeps the 32-bit words it loads:

- The weights are in the wgmma kernel's fragment order (``FragmentInt4``, fp16 variant), so the
  layer keeps one int4 layout for every M. A (16-row group, 128-column tile) block is 256 words; word
  w holds 4 bytes, of rows r and r + 8 (r = w >> 5) and byte columns j and j + 1, with j given by the
  low five bits of w (``FRAG_BASES``: 8, 16, 32, 2, 4). Byte j holds column j in its low nibble and
  column j + 64 in its high one. A program takes G row groups and, per loop step, TK consecutive
  tiles (``block_n`` = 16 G, ``block_k`` = 128 TK); lane c of a step reads one word of tile c >> 8,
  so a warp reads 128 contiguous bytes, and all of a word's 8 weights share 4 activations x[j],
  x[j + 1], x[j + 64], x[j + 65]. With ``num_stages`` >= 2 the next step's words are loaded before
  this step's arithmetic (in registers).
- Each nibble u becomes an fp32 number with no conversion instruction: placed in mantissa bits
  19-22 of 1.0 it reads as n = 1 + u / 16 (one shift and one LOP3). Then (u - z) x = 16 n x -
  (16 + z) x: one FMA per weight and activation row, and per half word (4 weights of one row and
  group) one FMA for the zero point against the activations' sum and one for the group scale. fp32
  throughout; the cancellation in 16 n x - (16 + z) x is of terms within 2-3x of the result, so the
  outputs stay within an fp16 ulp of the reference's fp32 sum (the tests hold them to that).
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

_NIB_MASK, _NIB_ONE = 0x780000, 0x3F800000  # mantissa bits 19-22; 1.0 (``_nib``)
FRAG_GEMV_MAX_M = 4  # activation rows per program: the weights are unpacked once for all of them


@triton.jit
def _nib(wv, SHIFT: tl.constexpr, mask, one):
    """Nibble u at bit SHIFT of each int32 word as the fp32 number 1 + u / 16 (u in mantissa bits
    19-22 of 1.0; exact, no cvt): one shift and one LOP3 per nibble. ``mask`` (0x780000) and ``one``
    (0x3F800000, 1.0) come in as kernel arguments: as two immediates ptxas splits (v & m) | c into two
    LOP3s (the instruction takes one immediate); from registers it is one."""
    if SHIFT <= 19:
        v = wv << (19 - SHIFT)
    else:
        v = wv >> (SHIFT - 19)  # arithmetic shift: the mask drops the sign bits
    return ((v & mask) | one).to(tl.float32, bitcast=True)


@triton.jit
def _half(n0, x0, n1, x1, zc, xs):
    """16 (n0 x0 + n1 x1) - zc xs for nibbles as 1 + u / 16 (``_nib``), zc = 16 + zero and
    xs = x0 + x1: (u0 - z) x0 + (u1 - z) x1, with one multiply or FMA per weight."""
    return 16.0 * (n0[None] * x0 + n1[None] * x1) - zc[None] * xs


@triton.jit
def _scale_zero(s_ptr, z_ptr, g, n, N, HAS_ZEROS: tl.constexpr):
    """Scales and 16 + zero points of scale groups g for output rows n, both (C, G): returned (G, C),
    fp32 (the lanes-first load, then the transpose: the kernel's comment)."""
    s = tl.trans(tl.load(s_ptr + g * N + n).to(tl.float32))
    if HAS_ZEROS:
        zc = tl.trans(tl.load(z_ptr + g * N + n).to(tl.float32)) + 16.0
    else:
        zc = tl.full(s.shape, 24.0, tl.float32)  # symmetric: zero 8
    return s, zc


@triton.jit
def _x_at(x_tile, k, K, OFF: tl.constexpr, EVEN_K: tl.constexpr):
    """Activations (BLOCK_M, 1, C) at columns k + OFF of the (C, BLOCK_M) pointers, fp32; 0 past K
    (whose codes decode to 0 too)."""
    if EVEN_K:
        x = tl.load(x_tile + OFF)
    else:
        x = tl.load(x_tile + OFF, mask=k[:, None] + OFF < K, other=0.0)
    return tl.trans(x.to(tl.float32))[:, None, :]


@triton.jit
def _words(w_tile, t, t1, tile, EVEN_SPLIT: tl.constexpr):
    """The (G, C) int32 words of the step starting at tile t (tiles at or past t1 read as 0)."""
    if EVEN_SPLIT:
        return tl.trans(tl.load(w_tile + t * 256))
    return tl.trans(tl.load(w_tile + t * 256, mask=(t + tile < t1)[:, None], other=0))


@triton.jit
def _w4a16_frag_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, n_groups16, tiles_per_split, n_tiles, stride_xm, stride_wg, stride_ym, nib_mask, nib_one,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_HALVES: tl.constexpr,
    BLOCK_M: tl.constexpr, G: tl.constexpr, TK: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_SPLIT: tl.constexpr, AHEAD: tl.constexpr, PDL: tl.constexpr = False,
):
    # w_ptr: (n_groups16, n_tiles * 256) int32 words of FragmentInt4. GROUP_HALVES: 64-column halves
    # of a tile per scale group (0: per channel, the scales applied at the end). Each program: G row
    # groups of 16 rows, TK tiles per loop step. Lane c (dim 0 of every tensor) is word c of the
    # step's TK * 256: tile c >> 8, rows (c >> 5) & 7 and + 8 of each row group.
    #
    # Why loads take lanes first and the arithmetic lanes last: no pointer here is contiguous (words
    # and activations are gathered), so Triton's coalescing puts a load's threads on its dim 0 first;
    # the arithmetic's default layout puts them on the last dim. Loaded (C, G) / (C, BLOCK_M) and
    # transposed (free: the same registers), everything has its threads on the lanes and meets in
    # registers. Loaded (G, C), the threads went to G and each step paid a shared-memory round trip.
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = tl.arange(0, BLOCK_M)
    gi = pid_n * G + tl.arange(0, G)
    c = tl.arange(0, TK * 256)
    # lane c reads the word whose byte column j is 2 * (c & 31): j's bits are the word's low five
    # (FRAG_BASES: 8, 16, 32, 2, 4), so word bits 0-4 are bits 2, 3, 4, 0, 1 of c
    wd = (c & ~31) | ((c >> 2) & 7) | ((c & 3) << 3)
    j = 2 * (c & 31) + (c >> 8) * 128  # (C,) column of byte j of each lane's word, step start at 0
    tile = c >> 8
    n_a = ((c >> 5) & 7)[:, None] + gi[None, :] * 16  # (C, G) row of bytes 0-1; bytes 2-3: n_a + 8
    n_a_ld = tl.minimum(n_a, N - 1)
    n_b_ld = tl.minimum(n_a + 8, N - 1)
    w_tile = w_ptr + wd[:, None] + tl.minimum(gi, n_groups16 - 1)[None, :] * stride_wg
    x_tile = x_ptr + j[:, None] + tl.minimum(rm, M - 1)[None, :] * stride_xm
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    if GROUP_HALVES == 0:  # per channel: zeros now, scales at the end
        s_a, zc_a = _scale_zero(s_ptr, z_ptr, 0, n_a_ld, N, HAS_ZEROS)
        s_b, zc_b = _scale_zero(s_ptr, z_ptr, 0, n_b_ld, N, HAS_ZEROS)
    wait(PDL)  # PDL (lowbit.kernels.pdl): the kernel before this one has completed
    acc_a = tl.zeros((BLOCK_M, G, 256), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, G, 256), dtype=tl.float32)
    if AHEAD:  # the first step's words; each step then loads the next one's before its arithmetic
        wn = _words(w_tile, t0, t1, tile, EVEN_SPLIT)
    for t in range(t0, t1, TK):
        k = t * 128 + j
        xt = x_tile + t * 128
        if AHEAD:
            wv = wn
            if EVEN_SPLIT:  # the next step; after the last one, the last again (from L2, unused)
                wn = _words(w_tile, tl.minimum(t + TK, t1 - TK), t1, tile, True)
            else:  # the next step, its tiles at or past t1 masked (after the last step: all of them)
                wn = _words(w_tile, t + TK, t1, tile, False)
        else:
            wv = _words(w_tile, t, t1, tile, EVEN_SPLIT)
        if not EVEN_SPLIT:  # tiles past this split's end read 0, and their activations count as past K
            k = k + (t + tile >= t1) * K
        # every split of whole steps and K a multiple of the tile: no column past K, no mask
        x0 = _x_at(xt, k, K, 0, EVEN_SPLIT and EVEN_K)
        x1 = _x_at(xt, k, K, 1, EVEN_SPLIT and EVEN_K)
        x2 = _x_at(xt, k, K, 64, EVEN_SPLIT and EVEN_K)
        x3 = _x_at(xt, k, K, 65, EVEN_SPLIT and EVEN_K)
        if GROUP_HALVES > 0:
            # padding tiles past K borrow the last group (their x is 0); GROUP_HALVES is a constant,
            # so the loop divides by no runtime value
            tt = (t + tile)[:, None]  # (C, 1)
            last = ((K - 1) // 64) // GROUP_HALVES
            g_lo = tl.minimum((2 * tt) // GROUP_HALVES, last)
            s_a, zc_a = _scale_zero(s_ptr, z_ptr, g_lo, n_a_ld, N, HAS_ZEROS)
            s_b, zc_b = _scale_zero(s_ptr, z_ptr, g_lo, n_b_ld, N, HAS_ZEROS)
            if GROUP_HALVES % 2 == 1:  # a tile's low and high nibbles (columns j, j + 64) in two groups
                g_hi = tl.minimum((2 * tt + 1) // GROUP_HALVES, last)
                s_ah, zc_ah = _scale_zero(s_ptr, z_ptr, g_hi, n_a_ld, N, HAS_ZEROS)
                s_bh, zc_bh = _scale_zero(s_ptr, z_ptr, g_hi, n_b_ld, N, HAS_ZEROS)
        # byte 0: (r, j), byte 1: (r, j + 1), byte 2: (r + 8, j), byte 3: (r + 8, j + 1); low nibble
        # column j, high nibble j + 64. Products (BLOCK_M, G, C). Nibbles as 1 + u / 16: the zero
        # point leaves the per-weight work and costs one FMA per half word against the activations'
        # sum (shared by every row); the cancellation is of terms within 2-3x of the result's scale.
        x01 = x0 + x1
        x23 = x2 + x3
        if GROUP_HALVES % 2 == 0:  # one group for the whole word: one FMA chain per row pair
            xs = x01 + x23
            q_a = 16.0 * (_nib(wv, 0, nib_mask, nib_one)[None] * x0 + _nib(wv, 8, nib_mask, nib_one)[None] * x1
                          + _nib(wv, 4, nib_mask, nib_one)[None] * x2
                          + _nib(wv, 12, nib_mask, nib_one)[None] * x3) - zc_a[None] * xs
            q_b = 16.0 * (_nib(wv, 16, nib_mask, nib_one)[None] * x0 + _nib(wv, 24, nib_mask, nib_one)[None] * x1
                          + _nib(wv, 20, nib_mask, nib_one)[None] * x2
                          + _nib(wv, 28, nib_mask, nib_one)[None] * x3) - zc_b[None] * xs
            if GROUP_HALVES > 0:
                q_a = s_a[None] * q_a
                q_b = s_b[None] * q_b
        else:
            q_a = (s_a[None] * _half(_nib(wv, 0, nib_mask, nib_one), x0,
                                     _nib(wv, 8, nib_mask, nib_one), x1, zc_a, x01)
                   + s_ah[None] * _half(_nib(wv, 4, nib_mask, nib_one), x2,
                                        _nib(wv, 12, nib_mask, nib_one), x3, zc_ah, x23))
            q_b = (s_b[None] * _half(_nib(wv, 16, nib_mask, nib_one), x0,
                                     _nib(wv, 24, nib_mask, nib_one), x1, zc_b, x01)
                   + s_bh[None] * _half(_nib(wv, 20, nib_mask, nib_one), x2,
                                        _nib(wv, 28, nib_mask, nib_one), x3, zc_bh, x23))
        # the TK tiles of a lane sum in its thread (it holds lanes c, c + 256, ...): accumulators for
        # one tile only, so more tiles per step cost loads in flight, not accumulator registers
        acc_a += tl.sum(tl.reshape(q_a, (BLOCK_M, G, TK, 256)), axis=2)
        acc_b += tl.sum(tl.reshape(q_b, (BLOCK_M, G, TK, 256)), axis=2)
    if GROUP_HALVES == 0:  # per channel: the scales of lanes 0-255 (every tile's are the same)
        acc_a = acc_a * tl.reshape(s_a, (1, G, TK, 256)).max(axis=2)
        acc_b = acc_b * tl.reshape(s_b, (1, G, TK, 256)).max(axis=2)
    # the 32 words of a row pair meet: (BM, G, 8 rows) for r and for r + 8
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
    """2 row groups (32 rows) and 2 tiles per step, loaded a step ahead; split-K to about two programs
    per SM, at least 4 tiles each."""
    programs = cdiv(N, 32)
    split = max(1, min(cdiv(K, 128) // 4, cdiv(2 * sms, programs)))
    return TileConfig(block_m=16, block_n=32, block_k=256, split_k=split, num_warps=8, num_stages=2)


def w4a16_frag_gemv(x: torch.Tensor, w: FragmentInt4, bias: torch.Tensor | None = None,
                    config: TileConfig | None = None) -> torch.Tensor:
    """x (M, K) fp16 or bf16 with M <= FRAG_GEMV_MAX_M, ``w`` a FragmentInt4 (fp16 order) -> (M, N) in
    x's dtype; bias (N,) or None. ``config``: block_n weight rows per program (a power of two >= 16),
    block_k columns per loop step (128-column tiles: block_k // 128 of them, at least one; more
    tiles per step, more loads in flight per thread), split_k programs per row block, num_warps (the
    256 words of a tile need 8 warps to be one word per thread), num_stages 2 or more: each step's
    weights loaded one step ahead (in registers: twice the bytes in flight); block_m is unused."""
    check_activation(x, w.K, (torch.float16, torch.bfloat16), "w4a16 fragment gemv")
    if not frag_gemv_takes(x, w):
        raise LowbitError(
            f"the w4a16 fragment gemv takes 1..{FRAG_GEMV_MAX_M} rows and a FragmentInt4 of the fp16 order with "
            f"groups of a multiple of 64 columns; got M={x.shape[0]}, int8 order {getattr(w, 'int8', None)}, "
            f"group {getattr(w, 'group_size', None)} (use w4a16_mixed_wgmma)")
    M, N = x.shape[0], w.N
    cfg = config or default_frag_gemv_config(N, w.K, sm_count(x.device, 8))
    G = cfg.block_n // 16  # TileConfig holds block_n to a power of two >= 16
    TK = max(1, cfg.block_k // 128)
    x = x.contiguous()
    w32 = w.qweight.view(torch.int32)  # (N16, n_tiles * 256)
    n_tiles = w32.shape[1] // 256
    # tiles per split: whole loop steps of TK tiles, so only the last split can end inside a step
    per = cdiv(cdiv(n_tiles, max(1, min(cfg.split_k, n_tiles))), TK) * TK
    split = cdiv(n_tiles, per)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (1, cdiv(N, cfg.block_n), split)
    ws, locks = reserve(x.device, M * N if split > 1 else 0, grid[1] if split > 1 else 0)
    triton_launch(
        _w4a16_frag_gemv_kernel, grid,
        x, w32, w.scales, w.zeros if w.zeros is not None else w.scales, bias if bias is not None else w.scales,
        y, ws, locks,
        M, N, w.K, w32.shape[0], per, n_tiles, x.stride(0), w32.stride(0), y.stride(0), _NIB_MASK, _NIB_ONE,
        HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None, GROUP_HALVES=(w.group_size or 0) // 64,
        BLOCK_M=next_power_of_2(M), G=G, TK=TK, SPLIT_K=split, EVEN_K=w.K % 128 == 0,
        EVEN_SPLIT=n_tiles % TK == 0, AHEAD=cfg.num_stages > 1, num_warps=cfg.num_warps, num_stages=1,
        **launch_options(x.device),
    )
    return y
