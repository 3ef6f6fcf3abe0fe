"""COMET W4Ax in Triton: int4 weights times activations in 128-channel blocks of 8 or 4 bits (FMPQ).

COMET (2024) quantizes activations per token and per block of 128 input channels: most blocks at 4
bits, the few that hold outlier channels at 8 bits. The channels were permuted offline
(``lowbit.quant.fmpq``) so that outliers share as few blocks as possible; they are sorted by
decreasing calibration absmax, so the 8-bit blocks always form a *prefix* of the blocks. Weights are
int4, group 128, stored in that permuted column order. One GEMM walks the K blocks of both kinds.

**Hopper has no INT4 tensor cores**: ``mma.sync`` s4 measured 52 TOPS (emulated, two IMMA.S8 per s4
MMA) against 1194 TOPS for s8 (../shared/PERF.md). So 4-bit activations are widened to int8 in
registers and every MMA here is an int8 one. What 4 bits buy on Hopper is *bytes moved*: a 4-bit
block reads half the activation bytes of an 8-bit one, not a faster MMA.

Two kernels, with PyTorch references that define their numerics:

1. ``quantize_mixed`` (one launch, one pass over x): gathers ``x[:, perm]`` (divided by the
   SmoothQuant factors first, if the layer kept them), takes one scale per (token, block) and writes
   the *mixed layout* (``MixedActivations``):
   - ``q_hi`` (M, 128 * n_hi) int8: the 8-bit blocks, codes in [-127, 127];
   - ``q_lo`` (M, 64 * n_lo) uint8: the 4-bit blocks, codes q in [-7, 7] stored as nibbles
     ``u = q + 8`` in [1, 15], tile-interleaved like ``PackedInt4`` (``lowbit.kernels.layout``): byte
     64i + j of the row holds channel 128i + j of 4-bit block i in its low nibble and channel
     128i + 64 + j in its high nibble, so one AND or one shift gives a contiguous (.., 64) int8 MMA
     operand (``lowbit.kernels.unpack.nibbles_int8``), with no shuffle;
   - ``scales`` (M, n_blocks) fp32: ``absmax / 127`` for 8-bit blocks, ``absmax / 7`` for 4-bit ones
     (``lowbit.numerics.primitives.quantize_activation`` per block, bit for bit: IEEE divisions and
     round-half-even). Stored block-major (strides (1, M)): the GEMM reads one block's scales for a
     tile of tokens as one contiguous load;
   - ``sums`` (M, n_blocks) int32, block-major: the sum of the *stored* codes of each block (int8
     codes, or nibbles u), which the GEMM needs for its offset terms (below) and which costs nothing
     here, where the codes are in registers anyway.
   A partial last block (K not a multiple of 128) is padded with codes of value 0 (int8 0, nibble 8).
2. ``w4ax_gemm``: int4 weights in ``PackedInt4`` with tile 128, so **one loop step = one activation
   block = one weight group**, and everything inside a step is exact in int32. With weight nibbles
   ``u_w`` (value ``u_w - z``, z = 8 if symmetric) and per-(token, block) code sums ``S``:
   - 8-bit block: ``sum_k q (u_w - z) = dot(q, u_w) - z * S``;
   - 4-bit block: ``sum_k (u - 8)(u_w - z) = dot(u, u_w) - z * S - 8 * sum_k (u_w - z)``, the last
     term a property of the weights alone, precomputed at load time (``PackedW4Ax.wsum``, int16).
   Both operands enter the int8 MMA as they are unpacked (one AND or one shift per 4 bytes), the
   offsets are rank-1 corrections of the int32 partial. The exact partial is then scaled by
   ``x_scale[m, block] * w_scale[block, n]`` into an fp32 accumulator. Because the 8-bit blocks are
   a prefix, the K loop is two loops (8-bit blocks, then 4-bit blocks) with no branch per step.

**Scheduling: cost-balanced split-K.** Blocks of the two precisions cost differently, so equal slices
of K would leave some SMs idle while others finish the expensive part (COMET balances work over SMs).
At small M an output tile's K loop is split over ``split_k`` programs (``lowbit.kernels.splitk``
reduces the fp32 partials in the same launch), each getting a contiguous range of blocks with an
equal share of the tile's *cost*: the bytes a program reads per block (``block_costs``). A split over
8-bit blocks (twice the activation bytes) gets fewer of them. The bounds are computed in the kernel
from four integers (``split_range``; Python mirror ``split_bounds``): no host-to-device copy, so a
launch captures into a CUDA graph. Not stream-K: every output tile covers the same blocks, so tiles
are equal in cost and the imbalance is only within a tile's K range, which these ranges remove while
keeping the one-launch split-K reduction (no SM-sized persistent grid, no fix-up pass). At large M
``split_k`` is 1 and balance comes from the many equal output tiles.

References: ``quantize_mixed_reference`` (the layout, from ``quantize_activation``),
``w4ax_gemm_reference`` (the GEMM on given quantized activations, fp32) and ``w4ax_reference``
(the whole layer from the checkpoint's buffers: ``QuantLinear.forward``'s numerics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowbit.device import sm_count
from lowbit.errors import LowbitError
from lowbit.formats import WeightFormat
from lowbit.kernels.config import TileConfig
from lowbit.kernels.launch import cdiv, next_power_of_2, triton_launch
from lowbit.kernels.layout import (
    PackedInt4,
    _interleave,
    pack_for_kernels,
    unpack_kernel_codes,
)
from lowbit.kernels.pdl import launch_options, start_small, wait
from lowbit.kernels.splitk import reserve, store_tile
from lowbit.kernels.unpack import USE_ASM, nibbles_int8
from lowbit.kernels.w4a8 import _mma
from lowbit.kernels.w4a16 import check_activation, load_x_halves
from lowbit.numerics.primitives import dequantize_weight, quantize_activation, unpack_int4

BLOCK = 128  # FMPQ block = weight group = PackedInt4 tile: one K loop step
HALF = BLOCK // 2  # the columns of one nibble of a packed tile
COST_UNIT = 1024  # an 8-bit block's cost after normalization (keeps the in-kernel products in int32)
_H100_SMS = 132  # SM count assumed off the GPU (interpreter), for default_config
_ROUND = 12582912.0  # 1.5 * 2**23: (v + R) - R rounds fp32 |v| < 2**22 half-to-even (as lowbit.kernels.act_quant)


# ---- layouts ------------------------------------------------------------------------------------

@dataclass
class PackedW4Ax:
    """A W4Ax layer in the kernel layout, built once at load time by ``pack_w4ax``.

    Columns (input channels) are in the FMPQ order: channel i of the kernel is input channel
    ``perm[i]`` of x. Blocks 0 .. n_hi - 1 are 8-bit, the others 4-bit.
    """

    weight: PackedInt4  # (N, Kp/2) uint8 nibbles, tile 128; scales (G, N) fp16; zeros (G, N) uint8 or None
    wsum: torch.Tensor  # (G, N) int16: 8 * sum over group g of (u - zero), the 4-bit blocks' offset term
    perm: torch.Tensor  # (K,) int32: act_perm, the x channel read for each kernel column
    smooth: torch.Tensor | None  # (K,) fp32 SmoothQuant factors in x's own channel order, or None
    bias: torch.Tensor | None  # (N,) any float dtype, or None
    n_hi: int  # number of 8-bit blocks (a prefix)

    @property
    def K(self) -> int:
        return self.weight.K

    @property
    def N(self) -> int:
        return self.weight.N

    @property
    def n_blocks(self) -> int:
        return self.weight.Kp // BLOCK

    def nbytes(self) -> int:
        """Bytes of weight-side tensors a GEMM reads (codes, scales, zeros, weight sums)."""
        return self.weight.nbytes() + self.wsum.numel() * 2


@dataclass
class MixedActivations:
    """Activations in the mixed 8/4-bit layout (module docstring), columns in the FMPQ order."""

    q_hi: torch.Tensor  # (M, 128 * n_hi) int8 codes of the 8-bit blocks
    q_lo: torch.Tensor  # (M, 64 * n_lo) uint8, two 4-bit codes per byte (u = q + 8), tile-interleaved
    scales: torch.Tensor  # (M, n_blocks) fp32, stored block-major (strides (1, M))
    sums: torch.Tensor  # (M, n_blocks) int32 sums of the stored codes per block, block-major
    K: int  # logical channels (the last block may be partial)

    @property
    def n_hi(self) -> int:
        return self.q_hi.shape[1] // BLOCK

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]


def pack_w4ax(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    act_perm: torch.Tensor | None,
    fmpq_high: torch.Tensor | None,
    *,
    in_features: int,
    group_size: int | None = BLOCK,
    zeros: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    act_bits: int = 4,
    block: int | None = BLOCK,
) -> PackedW4Ax:
    """The kernel layout of a COMET layer, from ``QuantLinear``'s buffers (checkpoint layout).

    qweight (N, ceil(K/2)) uint8 int4 codes (``pack_int4``), columns in act_perm order; scales (N, G)
    fp16; zeros (N, G) uint8 or None (symmetric); act_perm (K,) int64 or None (identity); fmpq_high
    (ceil(K/128),) bool or None (no 8-bit block); smooth (K,) fp32 or None; bias (N,) or None.
    ``act_bits``: the activation format's bits (8: every block is 8-bit, as the reference does);
    ``block``: its ``fmpq_block``. K = ``in_features`` (no QUIK outlier columns).
    """
    K = in_features
    if group_size != BLOCK or block != BLOCK:
        raise LowbitError(
            f"the W4Ax kernel needs weight group {BLOCK} and FMPQ block {BLOCK} (one packed tile = one weight "
            f"group = one activation block), got group {group_size} and block {block}; quantize with the "
            "w4a4kv4-comet preset, or keep this layer on the reference path")
    if act_bits not in (4, 8):
        raise LowbitError(f"the W4Ax kernel takes 4- or 8-bit activation blocks, got {act_bits} bits")
    n_blocks = -(-K // BLOCK)
    weight = pack_for_kernels(qweight, scales, zeros, BLOCK, K, tile_k=BLOCK)  # checks qweight, scales, zeros
    dev = qweight.device
    if act_perm is None:
        perm = torch.arange(K, device=dev)
    else:
        perm = act_perm.to(dev, torch.long)
        if perm.shape != (K,) or not torch.equal(torch.sort(perm).values, torch.arange(K, device=dev)):
            raise LowbitError(f"act_perm must be a permutation of 0..{K - 1} (shape ({K},)), got shape "
                              f"{tuple(act_perm.shape)}; the layer's FMPQ buffers are corrupt, re-quantize it")
    high = torch.zeros(n_blocks, dtype=torch.bool) if fmpq_high is None else fmpq_high.detach().cpu().bool()
    if high.shape != (n_blocks,):
        raise LowbitError(f"fmpq_high must be ({n_blocks},) for K={K} in blocks of {BLOCK}, got {tuple(high.shape)}")
    n_hi = n_blocks if act_bits == 8 else int(high.sum())
    if act_bits == 4 and not bool(high[:n_hi].all()):
        raise LowbitError(
            f"FMPQ 8-bit blocks must form a prefix of the blocks (channels sorted by decreasing absmax, "
            f"lowbit.quant.fmpq.assign_fmpq_blocks), got fmpq_high={high.int().tolist()}; re-run the "
            "FMPQ calibration or keep this layer on the reference path")
    if smooth is not None and (smooth.shape != (K,) or not smooth.is_floating_point()):
        raise LowbitError(f"smooth must be a float ({K},) vector, got {smooth.dtype} {tuple(smooth.shape)}")
    N = weight.N
    if bias is not None and bias.shape != (N,):
        raise LowbitError(f"bias must be ({N},), got {tuple(bias.shape)}")
    # value of each weight, u - zero, summed per group (padding columns are 0)
    vals = unpack_int4(qweight, K, signed=zeros is None).to(torch.int32)
    if zeros is not None:
        vals = vals - zeros.to(torch.int32)[:, torch.arange(K, device=dev) // BLOCK]
    vals = torch.nn.functional.pad(vals, (0, n_blocks * BLOCK - K))
    wsum = (8 * vals.view(N, n_blocks, BLOCK).sum(-1)).t().to(torch.int16).contiguous()  # |.| <= 8*128*15
    return PackedW4Ax(
        weight=weight, wsum=wsum, perm=perm.to(torch.int32).contiguous(),
        smooth=None if smooth is None else smooth.detach().to(dev, torch.float32).contiguous(),
        bias=None if bias is None else bias.detach().contiguous(), n_hi=n_hi,
    )


# ---- fused gather + smooth + per-block quantization ---------------------------------------------

@triton.jit
def _gather(x_ptr, perm_ptr, smooth_ptr, rm, m_ok, k, k_ok, stride_xm, HAS_SMOOTH: tl.constexpr):
    """x[rm, perm[k]] (/ smooth[perm[k]]) in fp32; zeros past K or M. (ROWS, HALF)."""
    src = tl.load(perm_ptr + k, mask=k_ok, other=0)
    ok = m_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + rm[:, None] * stride_xm + src[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + src, mask=k_ok, other=1.0)[None, :])
    return x


@triton.jit
def _round_clamp(v, qmax, ROUND: tl.constexpr):
    """round-half-even(v) clamped to [-qmax, qmax], as fp32 ((v + R) - R: exact for |v| < 2**22)."""
    return tl.minimum(tl.maximum((v + ROUND) - ROUND, -qmax), qmax)


@triton.jit
def _quant_block(x_ptr, perm_ptr, smooth_ptr, qh_ptr, ql_ptr, s_ptr, sum_ptr, b, rm, m_ok, rj,
                 M, K, n_hi, stride_xm, stride_qh, stride_ql,
                 HAS_SMOOTH: tl.constexpr, HALF_K: tl.constexpr, ROUND: tl.constexpr, FAKE: tl.constexpr):
    """Quantize block b of rows rm: its 128 permuted channels as two halves of 64, exactly the two
    nibbles of a packed byte, so packing needs no shuffle. ``FAKE``: store code * scale instead, in
    qh_ptr's dtype at kernel column k of an (M, K) tensor (row stride stride_qh), and nothing else."""
    k_lo = b * 2 * HALF_K + rj
    k_hi = k_lo + HALF_K
    x_lo = _gather(x_ptr, perm_ptr, smooth_ptr, rm, m_ok, k_lo, k_lo < K, stride_xm, HAS_SMOOTH)
    x_hi = _gather(x_ptr, perm_ptr, smooth_ptr, rm, m_ok, k_hi, k_hi < K, stride_xm, HAS_SMOOTH)
    high = b < n_hi
    qmax = tl.where(high, 127.0, 7.0)
    absmax = tl.maximum(tl.max(tl.abs(x_lo), axis=1), tl.max(tl.abs(x_hi), axis=1))
    scale = tl.maximum(tl.math.div_rn(absmax, qmax), 1e-12)  # IEEE division, as the reference
    c_lo = _round_clamp(tl.math.div_rn(x_lo, scale[:, None]), qmax, ROUND).to(tl.int32)
    c_hi = _round_clamp(tl.math.div_rn(x_hi, scale[:, None]), qmax, ROUND).to(tl.int32)
    if FAKE:
        DT = qh_ptr.dtype.element_ty
        row = qh_ptr + rm[:, None] * stride_qh
        tl.store(row + k_lo[None, :], (c_lo.to(tl.float32) * scale[:, None]).to(DT), mask=m_ok[:, None] & (k_lo < K)[None, :])
        tl.store(row + k_hi[None, :], (c_hi.to(tl.float32) * scale[:, None]).to(DT), mask=m_ok[:, None] & (k_hi < K)[None, :])
        return
    full = m_ok[:, None] & (rj[None, :] >= 0)
    # 8-bit block: int8 codes at columns 128 b + j and 128 b + 64 + j
    qh = qh_ptr + rm[:, None] * stride_qh + b * 2 * HALF_K + rj[None, :]
    tl.store(qh, c_lo.to(tl.int8), mask=full & high)
    tl.store(qh + HALF_K, c_hi.to(tl.int8), mask=full & high)
    # 4-bit block: nibbles u = q + 8, channel j low and channel 64 + j high in byte j
    ql = ql_ptr + rm[:, None] * stride_ql + (b - n_hi) * HALF_K + rj[None, :]
    tl.store(ql, (((c_lo + 8) & 0xF) | (((c_hi + 8) & 0xF) << 4)).to(tl.uint8), mask=full & (b >= n_hi))
    total = tl.sum(c_lo, axis=1) + tl.sum(c_hi, axis=1) + tl.where(high, 0, 8 * 2 * HALF_K)
    tl.store(s_ptr + b * M + rm, scale, mask=m_ok)  # block-major
    tl.store(sum_ptr + b * M + rm, total, mask=m_ok)


@triton.jit
def _quant_kernel(
    x_ptr, perm_ptr, smooth_ptr, qh_ptr, ql_ptr, s_ptr, sum_ptr,
    M, K, n_hi, n_blocks, blocks_per_prog, stride_xm, stride_qh, stride_ql,
    HAS_SMOOTH: tl.constexpr, ROWS: tl.constexpr, HALF_K: tl.constexpr, ROUND: tl.constexpr,
    FAKE: tl.constexpr = False, PDL: tl.constexpr = False,
):
    start_small(PDL)  # PDL (lowbit.kernels.pdl): the GEMM after this launches now, the kernel before has completed
    # program (ROWS tokens, a run of blocks): at large M a run covers the whole row, so the random
    # gathers of a row hit L1 after its first touch instead of pulling a 32-byte L2 sector per element
    pid_m = tl.program_id(0)
    b0 = tl.program_id(1) * blocks_per_prog
    rm = pid_m * ROWS + tl.arange(0, ROWS)
    rj = tl.arange(0, HALF_K)
    m_ok = rm < M
    for b in range(b0, tl.minimum(b0 + blocks_per_prog, n_blocks)):
        _quant_block(x_ptr, perm_ptr, smooth_ptr, qh_ptr, ql_ptr, s_ptr, sum_ptr, b, rm, m_ok, rj,
                     M, K, n_hi, stride_xm, stride_qh, stride_ql, HAS_SMOOTH, HALF_K, ROUND, FAKE)


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """A kernel argument for a tensor that may have no elements (its loads and stores are masked)."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _empty_mixed(M: int, K: int, n_hi: int, device: torch.device) -> MixedActivations:
    nb = -(-K // BLOCK)
    return MixedActivations(
        q_hi=torch.empty(M, BLOCK * n_hi, dtype=torch.int8, device=device),
        q_lo=torch.empty(M, HALF * (nb - n_hi), dtype=torch.uint8, device=device),
        scales=torch.empty(nb, M, dtype=torch.float32, device=device).t(),
        sums=torch.empty(nb, M, dtype=torch.int32, device=device).t(),
        K=K,
    )


def _check_mixed_args(x: torch.Tensor, perm: torch.Tensor, n_hi: int, smooth: torch.Tensor | None) -> None:
    if x.ndim != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LowbitError(f"W4Ax activation quantization takes (M, K) fp16/bf16/fp32, got {x.dtype} {tuple(x.shape)}")
    K = x.shape[1]
    if perm.shape != (K,) or perm.dtype not in (torch.int32, torch.int64):
        raise LowbitError(f"perm must be an int32/int64 ({K},) permutation, got {perm.dtype} {tuple(perm.shape)}")
    if not 0 <= n_hi <= -(-K // BLOCK):
        raise LowbitError(f"n_hi must be in [0, {-(-K // BLOCK)}] (blocks of {BLOCK} in K={K}), got {n_hi}")
    if smooth is not None and (smooth.shape != (K,) or smooth.dtype != torch.float32):
        raise LowbitError(f"smooth must be fp32 ({K},), got {smooth.dtype} {tuple(smooth.shape)}")


@dataclass(frozen=True)
class QuantLaunch:
    """How ``_quant_kernel`` is launched for x (M, K): ``rows`` tokens per program, ``blocks`` 128-blocks
    walked per program, ``grid`` and ``num_warps`` (``quantize_mixed`` and the FAKE mode share it)."""

    rows: int
    blocks: int
    grid: tuple[int, int]
    num_warps: int

    @classmethod
    def for_input(cls, x: torch.Tensor, blocks_per_program: int | None = None) -> QuantLaunch:
        M, K = x.shape
        # rows per program: at most 16, and their gathered rows within ~64 KB of L1
        cap = max(1, 65536 // (K * x.element_size()))
        rows = min(16, next_power_of_2(M), 1 << (cap.bit_length() - 1))
        row_tiles, nb = cdiv(M, rows), -(-K // BLOCK)
        bpp = blocks_per_program or max(1, min(nb, row_tiles * nb // (4 * sm_count(x.device, _H100_SMS))))
        return cls(rows, bpp, (row_tiles, cdiv(nb, bpp)), max(1, min(4, rows * BLOCK // 512)))


def quantize_mixed(
    x: torch.Tensor,
    perm: torch.Tensor,
    n_hi: int,
    smooth: torch.Tensor | None = None,
    *,
    blocks_per_program: int | None = None,
) -> MixedActivations:
    """x (M, K) fp16/bf16/fp32 -> ``MixedActivations``, in one launch.

    perm (K,) int32/int64: kernel column i reads channel perm[i] of x; the first ``n_hi`` blocks of
    128 kernel columns are 8-bit, the others 4-bit. smooth (K,) fp32 in x's channel order: x is
    divided by it first. Bit-exact with ``quantize_mixed_reference``. ``blocks_per_program``: blocks
    one program walks (default: 1 at small M, for parallelism; up to the whole row at large M).
    """
    _check_mixed_args(x, perm, n_hi, smooth)
    x = x.contiguous()
    M, K = x.shape
    out = _empty_mixed(M, K, n_hi, x.device)
    if M == 0:
        return out
    launch = QuantLaunch.for_input(x, blocks_per_program)
    qh, ql = _nonempty(out.q_hi), _nonempty(out.q_lo)
    triton_launch(_quant_kernel, launch.grid,
        x, perm.contiguous(), smooth if smooth is not None else out.scales, qh, ql, out.scales, out.sums,
        M, K, n_hi, out.n_blocks, launch.blocks, x.stride(0), out.q_hi.shape[1], out.q_lo.shape[1],
        HAS_SMOOTH=smooth is not None, ROWS=launch.rows, HALF_K=HALF, ROUND=_ROUND,
        num_warps=launch.num_warps, **launch_options(x.device),
    )
    return out


# ---- the GEMM -----------------------------------------------------------------------------------

@triton.jit
def _block_at(target, n_hi, hi_total, cost_hi, cost_lo):
    """The block boundary nearest to cumulative cost ``target`` (8-bit blocks first, then 4-bit)."""
    in_hi = (target + cost_hi // 2) // cost_hi
    in_lo = n_hi + (target - hi_total + cost_lo // 2) // cost_lo
    return tl.where(target <= hi_total, in_hi, in_lo)


@triton.jit
def split_range(pid_k, n_hi, n_blocks, cost_hi, cost_lo, SPLIT_K: tl.constexpr):
    """Blocks [first, last) of split ``pid_k``: contiguous ranges of equal cost (``split_bounds``)."""
    hi_total = n_hi * cost_hi
    total = hi_total + (n_blocks - n_hi) * cost_lo
    first = _block_at(pid_k * total // SPLIT_K, n_hi, hi_total, cost_hi, cost_lo)
    last = _block_at((pid_k + 1) * total // SPLIT_K, n_hi, hi_total, cost_hi, cost_lo)
    return first, last


@triton.jit
def _along_n(v, SWAP: tl.constexpr):
    """(BLOCK_N,) laid along the accumulator's weight-row axis."""
    return v[:, None] if SWAP else v[None, :]


@triton.jit
def _along_m(v, SWAP: tl.constexpr):
    """(BLOCK_M,) laid along the accumulator's token axis."""
    return v[None, :] if SWAP else v[:, None]


@triton.jit
def _add_block(acc, p, b, M, N, rn_ld, xs_col, xsum_col, s_ptr, z_ptr, wsum_ptr,
               HAS_ZEROS: tl.constexpr, LOW: tl.constexpr, SWAP: tl.constexpr):
    """acc + (exact int32 partial of block b, offsets removed) * x_scale[m, b] * w_scale[b, n]."""
    xsum = tl.load(xsum_col + b * M)  # sum of the stored activation codes of block b
    if HAS_ZEROS:
        p = p - _along_n(tl.load(z_ptr + b * N + rn_ld).to(tl.int32), SWAP) * _along_m(xsum, SWAP)
    else:
        p = p - _along_m(8 * xsum, SWAP)
    if LOW:  # 4-bit activations are stored as u = q + 8: remove 8 * sum_k w
        p = p - _along_n(tl.load(wsum_ptr + b * N + rn_ld).to(tl.int32), SWAP)
    ws = tl.load(s_ptr + b * N + rn_ld).to(tl.float32)
    xs = tl.load(xs_col + b * M)
    return acc + p.to(tl.float32) * (_along_n(ws, SWAP) * _along_m(xs, SWAP))


@triton.jit
def _w4ax_kernel(
    xh_ptr, xl_ptr, xs_ptr, xsum_ptr, w_ptr, s_ptr, z_ptr, wsum_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, n_hi, n_blocks, cost_hi, cost_lo,
    stride_xh, stride_xl, stride_wn, stride_ym,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr,
    HALF_K: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF_K)
    # clamped rows instead of load masks (lowbit.kernels.w4a16); K is padded to whole blocks on both sides
    rm_ld = tl.minimum(rm, M - 1)
    rn_ld = tl.minimum(rn, N - 1)
    w_row = w_ptr + rn_ld[:, None] * stride_wn + rj[None, :]
    xh_row = xh_ptr + rm_ld[:, None] * stride_xh + rj[None, :]
    xl_row = xl_ptr + rm_ld[:, None] * stride_xl + rj[None, :]
    xs_col = xs_ptr + rm_ld  # block-major (n_blocks, M)
    xsum_col = xsum_ptr + rm_ld
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first, last = split_range(pid_k, n_hi, n_blocks, cost_hi, cost_lo, SPLIT_K)
    wait(PDL)  # PDL: quantize_mixed before this kernel has completed
    # phase 1: 8-bit activation blocks (a prefix), int8 codes straight into the MMA
    for b in range(first, tl.minimum(last, n_hi)):
        wb = tl.load(w_row + b * HALF_K)
        x_lo, x_hi = load_x_halves(xh_row, b * 2 * HALF_K, 0, rj, HALF_K, True)
        p = _mma(nibbles_int8(wb, False, ASM), x_lo, tl.zeros(acc.shape, dtype=tl.int32), SWAP, tl.int32)
        p = _mma(nibbles_int8(wb, True, ASM), x_hi, p, SWAP, tl.int32)
        acc = _add_block(acc, p, b, M, N, rn_ld, xs_col, xsum_col, s_ptr, z_ptr, wsum_ptr, HAS_ZEROS, False, SWAP)
    # phase 2: 4-bit activation blocks, widened to int8 with one AND / one shift, like the weights
    for b in range(tl.maximum(first, n_hi), last):
        wb = tl.load(w_row + b * HALF_K)
        xb = tl.load(xl_row + (b - n_hi) * HALF_K)
        p = _mma(nibbles_int8(wb, False, ASM), nibbles_int8(xb, False, ASM), tl.zeros(acc.shape, dtype=tl.int32),
                 SWAP, tl.int32)
        p = _mma(nibbles_int8(wb, True, ASM), nibbles_int8(xb, True, ASM), p, SWAP, tl.int32)
        acc = _add_block(acc, p, b, M, N, rn_ld, xs_col, xsum_col, s_ptr, z_ptr, wsum_ptr, HAS_ZEROS, True, SWAP)
    if SWAP:
        acc = tl.trans(acc)  # (BLOCK_M, BLOCK_N)
    store_tile(acc, rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, stride_ym, HAS_BIAS, SPLIT_K)


def block_costs(M: int, config: TileConfig, has_zeros: bool = False) -> tuple[int, int]:
    """(cost of an 8-bit block, cost of a 4-bit block) for one program, normalized to ``COST_UNIT``.

    Cost = bytes the program reads per block: per weight row 64 bytes of codes, a 2-byte scale
    (+ 1-byte zero point), + a 2-byte weight sum in 4-bit blocks; per token row (min(M, block_m)
    rows are distinct) 128 or 64 bytes of codes, a 4-byte scale and a 4-byte code sum.
    """
    rows = min(M, config.block_m)
    w = config.block_n * (HALF + 2 + (1 if has_zeros else 0))
    hi = w + rows * (BLOCK + 8)
    lo = w + config.block_n * 2 + rows * (HALF + 8)
    return COST_UNIT, max(1, round(COST_UNIT * lo / hi))


def split_bounds(n_hi: int, n_blocks: int, cost_hi: int, cost_lo: int, split_k: int) -> list[int]:
    """The block boundaries [b_0 = 0, ..., b_split_k = n_blocks] that ``split_range`` computes in the kernel."""
    hi_total = n_hi * cost_hi
    total = hi_total + (n_blocks - n_hi) * cost_lo

    def at(t: int) -> int:
        if t <= hi_total:
            return (t + cost_hi // 2) // cost_hi
        return n_hi + (t - hi_total + cost_lo // 2) // cost_lo

    return [at(s * total // split_k) for s in range(split_k + 1)]


def default_config(M: int, N: int, n_blocks: int, sms: int = _H100_SMS) -> TileConfig:
    """A Hopper default until the tuner has a table for this op.

    M <= 64: swapped tiles (weights on the MMA's 64-row side) and split-K so that about two programs
    per SM stream weights (decode is memory-bound); larger M: 64 x 128 tiles, the shape the H100
    table picks for W4A8 g128 at M = 128-256 (same per-group int32 partial, lowbit/kernels/tuned/h100.json).
    """
    if M <= 64:
        block_m = max(16, next_power_of_2(M))
        block_n = 64 if M <= 16 else 128
        tiles = cdiv(M, block_m) * cdiv(N, block_n)
        split = max(1, min(16, n_blocks, round(2 * sms / tiles)))
        return TileConfig(block_m=block_m, block_n=block_n, split_k=split, num_warps=4, num_stages=4, swap=True)
    return TileConfig(block_m=64, block_n=128, num_warps=4, num_stages=4)


def w4ax_gemm(
    acts: MixedActivations, w: PackedW4Ax, out_dtype: torch.dtype, config: TileConfig | None = None
) -> torch.Tensor:
    """Quantized activations (``quantize_mixed``) @ W^T (+ w.bias) -> (M, N) ``out_dtype`` (fp16/bf16/fp32).

    ``config``: tiles, split-K, warps, stages, swap (``block_k`` is ignored: a step is one 128-block).
    """
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LowbitError(f"w4ax: out_dtype must be fp16, bf16 or fp32, got {out_dtype}")
    if acts.K != w.K or acts.n_hi != w.n_hi or acts.n_blocks != w.n_blocks:
        raise LowbitError(f"w4ax: activations (K={acts.K}, {acts.n_hi} 8-bit of {acts.n_blocks} blocks) do not "
                          f"match the layer (K={w.K}, {w.n_hi} 8-bit of {w.n_blocks}); quantize them with its perm/n_hi")
    M, N = acts.scales.shape[0], w.N
    dev = w.weight.qweight.device
    y = torch.empty(M, N, dtype=out_dtype, device=dev)
    if M == 0:
        return y
    cfg = config or default_config(M, N, w.n_blocks, sm_count(dev, _H100_SMS))
    grid = (cdiv(M, cfg.block_m), cdiv(N, cfg.block_n), cfg.split_k)
    ws, locks = reserve(dev, M * N if cfg.split_k > 1 else 0, grid[0] * grid[1] if cfg.split_k > 1 else 0)
    cost_hi, cost_lo = block_costs(M, cfg, w.weight.zeros is not None)
    q_hi, q_lo = acts.q_hi.contiguous(), acts.q_lo.contiguous()
    p = w.weight
    triton_launch(_w4ax_kernel, grid,
        _nonempty(q_hi), _nonempty(q_lo), acts.scales.t().contiguous(), acts.sums.t().contiguous(),
        p.qweight, p.scales, p.zeros if p.zeros is not None else p.scales, w.wsum,
        w.bias if w.bias is not None else p.scales, y, ws, locks,
        M, N, w.n_hi, w.n_blocks, cost_hi, cost_lo,
        q_hi.shape[1], q_lo.shape[1], p.qweight.stride(0), y.stride(0),
        HAS_ZEROS=p.zeros is not None, HAS_BIAS=w.bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, SWAP=cfg.swap, HALF_K=HALF, ASM=USE_ASM,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(dev),
    )
    return y


def w4ax_matmul(x: torch.Tensor, w: PackedW4Ax, config: TileConfig | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16 in the layer's input channel order -> (M, N) in x's dtype (two launches:
    ``quantize_mixed``, then ``w4ax_gemm``)."""
    check_activation(x, w.K, (torch.float16, torch.bfloat16), "w4ax")
    return w4ax_gemm(quantize_mixed(x, w.perm, w.n_hi, w.smooth), w, x.dtype, config)


# ---- references (fp32, from lowbit.numerics.primitives) ---------------------------------------------

def quantize_mixed_reference(
    x: torch.Tensor, perm: torch.Tensor, n_hi: int, smooth: torch.Tensor | None = None
) -> MixedActivations:
    """What ``quantize_mixed`` must produce, bit for bit, built from ``quantize_activation`` per block."""
    _check_mixed_args(x, perm, n_hi, smooth)
    M, K = x.shape
    xf = x.float() if smooth is None else x.float() / smooth
    xp = xf[:, perm.long()]
    out = _empty_mixed(M, K, n_hi, x.device)
    nib = torch.full((M, BLOCK * (out.n_blocks - n_hi)), 8, dtype=torch.int32, device=x.device)  # value 0
    out.q_hi.zero_()
    for b in range(out.n_blocks):
        lo, hi = b * BLOCK, min(K, (b + 1) * BLOCK)
        codes, scale = quantize_activation(xp[:, lo:hi], 8 if b < n_hi else 4)
        out.scales[:, b] = scale[:, 0]
        if b < n_hi:
            out.q_hi[:, lo:hi] = codes
            out.sums[:, b] = codes.to(torch.int32).sum(1)
        else:
            o = (b - n_hi) * BLOCK
            nib[:, o:o + hi - lo] = codes.to(torch.int32) + 8
            out.sums[:, b] = nib[:, o:o + BLOCK].sum(1)
    out.q_lo.copy_(_interleave(nib.to(torch.uint8), BLOCK))
    return out


def dequantize_mixed(acts: MixedActivations) -> torch.Tensor:
    """(M, K) fp32 activations (FMPQ column order) from the mixed layout: code * its block's scale."""
    M = acts.scales.shape[0]
    b = acts.q_lo.view(M, acts.n_blocks - acts.n_hi, HALF).to(torch.int32)
    lo_codes = torch.stack([b & 0xF, b >> 4], dim=2).reshape(M, -1) - 8
    codes = torch.cat([acts.q_hi.to(torch.int32), lo_codes], dim=1)[:, :acts.K]
    return codes.float() * acts.scales.repeat_interleave(BLOCK, dim=1)[:, :acts.K]


def w4ax_gemm_reference(acts: MixedActivations, w: PackedW4Ax, out_dtype: torch.dtype) -> torch.Tensor:
    """What ``w4ax_gemm`` computes, in fp32 from the two kernel layouts: (M, N) ``out_dtype``."""
    p = w.weight
    g = torch.arange(w.K, device=p.qweight.device) // BLOCK
    z = 8.0 if p.zeros is None else p.zeros.t().float()[:, g]
    wt = (unpack_kernel_codes(p).float() - z) * p.scales.t().float()[:, g]
    y = dequantize_mixed(acts) @ wt.t()
    return (y if w.bias is None else y + w.bias.float()).to(out_dtype)


def w4ax_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    act_perm: torch.Tensor,
    fmpq_high: torch.Tensor,
    *,
    zeros: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    act_bits: int = 4,
) -> torch.Tensor:
    """The COMET layer from its checkpoint buffers (``pack_w4ax``'s arguments), fp32 math.

    x (M, K) float -> (M, N) in x's dtype: ``QuantLinear.forward``'s numerics for this format (divide
    by smooth, gather act_perm, quantize each block of 128 per token at 8 bits where fmpq_high (or
    act_bits == 8) else 4, dequantize the int4 group-128 weights, multiply, add bias).
    """
    K = act_perm.numel()
    xf = x.float() if smooth is None else x.float() / smooth
    xp = xf[..., act_perm]
    xq = torch.empty(xp.shape, dtype=torch.float32, device=x.device)
    for b in range(math.ceil(K / BLOCK)):
        sl = slice(b * BLOCK, min(K, (b + 1) * BLOCK))
        codes, scale = quantize_activation(xp[..., sl], 8 if act_bits == 8 or bool(fmpq_high[b]) else 4)
        xq[..., sl] = codes.float() * scale
    fmt = WeightFormat(bits=4, symmetric=zeros is None, group_size=BLOCK, method="rtn")
    wt = dequantize_weight(unpack_int4(qweight, K, signed=zeros is None), scales, zeros, fmt)
    out = xq @ wt.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
