"""W4A4 with fp16 outlier columns (QUIK, Ashkboos et al. 2023): int4 weights x int4 activations.

QUIK keeps a few hundred input channels with the largest activations (``outlier_idx``) in fp16,
together with their weight columns (``outlier_weight``); every other ("kept") column is quantized to
int4 per token. With ``x`` the input divided by the optional SmoothQuant factors,

    y = (q_a @ q_w^T) * x_scale[m] * w_scale[n]  +  x[:, outlier_idx] @ outlier_weight^T  (+ bias).

**Hopper has no INT4 tensor cores.** ``mma.sync`` on s4 runs at 52 TOPS on an H100, emulated with two
IMMA.S8 per MMA, against 1194 TOPS for s8 (../shared/PERF.md). So both 4-bit operands are widened to
int8 in registers and multiplied on the INT8 tensor cores: 4-bit activations buy bytes moved (half
those of W4A8's activations), never MMA rate. At small M the GEMM streams its weights (int4 codes
plus fp16 outlier columns: 0.5 * Kq + 2 * n_out bytes per output row); at large M it runs at the
int8 MMA rate, as W4A8 does.

Two kernels, both with a plain-PyTorch reference below that defines their numerics:

1. ``split_quantize`` (one program per token): gathers the kept columns through a precomputed int32
   index vector (built once by ``pack_quik``), divides by the smoothing factors, quantizes per token
   (``scale = absmax / 7``, ``q = round_half_even(x / scale)`` clamped to [-7, 7], bit-exact to
   ``lowbit.numerics.primitives.quantize_activation(x, 4, "int")``) and stores the codes packed two per
   byte; the outlier columns go out as a small (M, n_out) fp16/bf16 tensor.
2. ``w4a4_matmul``: one K loop of int8 ``tl.dot`` over the packed tiles (int32 accumulation, exact),
   the zero points removed once, the scales applied, then a second loop of fp16/bf16 ``tl.dot`` over
   the outlier columns into the same fp32 accumulator, then bias and the (split-K) store.

Activation layout (``QuikActivations.codes``, (M, Kqp/2) uint8): the tile-interleaved nibble order
of ``lowbit.kernels.layout.PackedInt4`` with the weight's tile T, so that ``byte & 0xF`` and
``byte >> 4`` of a loaded tile are the activations of the weight tile's two halves: byte
``t*T/2 + j`` holds column ``t*T + j`` in its low nibble and ``t*T + T/2 + j`` in its high nibble
(columns counted among the kept columns, ascending). Kqp = Kq rounded up to whole tiles.

Sign handling: activation nibbles are **offset** codes ``u_a = q_a + 8`` (1..15; padding 8 = value
0), like the weights' ``u_w = q_w + 8``. Both then become int8 operands with one AND or one shift
(``lowbit.kernels.unpack.nibbles_int8``), where two's complement would need a sign extension (three
PTX instructions per four bytes instead of one) on every operand byte. The offsets come out of the
MMA exactly, once per output, as W4A8's int8 path does with its zero point:

    sum_k (u_a - 8)(u_w - 8) = sum_k u_a u_w - 8 * (S_a[m] + S_w[n]),

with ``S_a[m] = sum_k u_a`` over all Kqp columns (written by ``split_quantize``, free there) and
``S_w[n] = sum_k q_w`` (computed once by ``pack_quik``). All int32, exact (|sum| <= 225 * Kqp).

Split-K (``lowbit.kernels.splitk``) for small M: the int4 tiles are dealt round-robin from split 0,
the outlier tiles round-robin from the last split, so that the outlier bytes (512 per row for 256
columns, a fifth of a 4096-wide layer's) do not all land on one split, which would then set the
time of the whole launch; the offset correction is added by split 0 only.

Numerics: ``split_quantize`` is bit-exact to ``split_quantize_reference``; ``w4a4_matmul``'s integer
part is exact and its outlier part is an fp16 MMA with fp32 accumulation (``w4a4_reference``);
``quik_matmul`` differs from ``quik_reference`` (= ``QuantLinear.forward``, fp32) only by the
outlier activations rounded to the model dtype, the accumulation order and the output rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lowbit.device import sm_count
from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, WeightFormat
from lowbit.kernels.config import TileConfig
from lowbit.kernels.launch import cdiv, next_power_of_2, triton_launch
from lowbit.kernels.layout import (
    TILE_K,
    PackedInt4,
    _interleave,
    pack_for_kernels,
    unpack_kernel_codes,
)
from lowbit.kernels.pdl import launch_options, start_small, wait
from lowbit.kernels.splitk import reserve, store_tile
from lowbit.kernels.unpack import USE_ASM, nibbles_int8
from lowbit.kernels.w4a8 import _mma, _outer
from lowbit.kernels.w4a16 import check_activation
from lowbit.numerics.primitives import (
    dequantize_weight,
    fake_quantize_activation,
    quantize_activation,
    unpack_int4,
)

MAX_K = 65536  # split_quantize holds a whole row in registers, as lowbit.kernels.act_quant does
QMAX = 7.0  # 4-bit activations: absmax / 7, so -8 is never produced (primitives.quantize_activation)
OFFSET = 8  # nibble u = q + 8 for weights and activations
_ROUND = 12582912.0  # 1.5 * 2**23: (v + R) - R rounds an fp32 |v| < 2**22 to the nearest even integer
_FLOAT = (torch.float16, torch.bfloat16)


# ---- formats and layout -------------------------------------------------------------------------

def check_format(wfmt: WeightFormat, afmt: ActivationFormat) -> None:
    """Raise a LowbitError unless this kernel runs (wfmt, afmt): per-channel symmetric int4 weights,
    per-token int4 activations, optional fp16 outlier columns, no FMPQ blocks or 2:4 sparsity."""
    if wfmt.bits != 4 or wfmt.dtype != "int" or not wfmt.symmetric or wfmt.group_size is not None or wfmt.sparsity:
        raise LowbitError(f"the W4A4 kernel takes per-channel symmetric int4 weights, got {wfmt}; "
                          "this layer stays on the reference path (QuantLinear.forward)")
    if afmt.bits != 4 or afmt.dtype != "int" or afmt.fmpq_block is not None:
        raise LowbitError(f"the W4A4 kernel takes per-token int4 activations without FMPQ blocks, got {afmt}; "
                          "this layer stays on the reference path (QuantLinear.forward)")


@dataclass
class PackedQuik:
    """A QUIK layer (N out x K in) in the kernel layout; built once by ``pack_quik``.

    weight        PackedInt4 over the Kq = K - n_out kept columns: qweight (N, Kqp/2) uint8,
                  scales (1, N) fp16, per channel, symmetric (u = q + 8)
    w_sum         (N,) int32, sum of each row's signed weight codes q_w (the offset correction)
    kept_idx      (Kq,) int64, the kept input columns, ascending
    gather_idx    (2, Kqp/2) int32: input column of each packed byte's low (row 0) and high (row 1)
                  nibble, -1 on padding (the gather ``split_quantize`` does)
    gather_smooth (2, Kqp/2) fp32 smoothing divisors in the same order (1 on padding), or None
    outlier_idx   (n_out,) int64 outlier input columns, ascending (empty: plain W4A4)
    outlier_src   (n_out,) int32, the same as the gather kernel reads them
    outlier_smooth (n_out,) fp32 smoothing divisors of the outlier columns, or None
    outlier_weight (N, n_out_p) fp16/bf16, zero-padded to a multiple of ``out_k``, or None (n_out = 0)
    smooth        (K,) fp32 or None (kept for the references)
    """

    weight: PackedInt4
    w_sum: torch.Tensor
    kept_idx: torch.Tensor
    gather_idx: torch.Tensor
    gather_smooth: torch.Tensor | None
    outlier_idx: torch.Tensor
    outlier_src: torch.Tensor
    outlier_smooth: torch.Tensor | None
    outlier_weight: torch.Tensor | None
    smooth: torch.Tensor | None
    in_features: int
    out_k: int  # outlier columns per MMA step (16, 32 or 64)

    @property
    def N(self) -> int:
        return self.weight.N

    @property
    def Kq(self) -> int:
        return self.weight.K

    @property
    def n_out(self) -> int:
        return self.outlier_idx.numel()

    @property
    def dtype(self) -> torch.dtype | None:
        """dtype of the outlier weights (and activations), None without outliers."""
        return None if self.outlier_weight is None else self.outlier_weight.dtype

    def nbytes(self) -> int:
        """Bytes the GEMM reads for the weights: int4 codes, scales, outlier columns."""
        n = self.weight.nbytes() + self.w_sum.numel() * 4
        return n + (0 if self.outlier_weight is None else self.outlier_weight.numel() * 2)


def _tile_order(v: torch.Tensor, tile_k: int) -> torch.Tensor:
    """(Kqp,) in column order -> (2, Kqp/2): row 0 the low-nibble column of each byte, row 1 the high."""
    return v.view(-1, 2, tile_k // 2).transpose(0, 1).reshape(2, -1).contiguous()


def pack_quik(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    in_features: int,
    outlier_idx: torch.Tensor | None = None,
    outlier_weight: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    tile_k: int = TILE_K,
    dtype: torch.dtype | None = None,
) -> PackedQuik:
    """The kernel layout from a QuantLinear's buffers (``lowbit.model.qlinear``), once at load time.

    qweight (N, ceil(Kq/2)) uint8 (``pack_int4`` of the signed codes of the kept columns); scales
    (N, 1) fp16; outlier_idx (n_out,) int ascending or None; outlier_weight (N, n_out) fp16/bf16 (the
    model dtype; ``dtype`` casts it, e.g. to the activation dtype); smooth (K,) fp32 or None.
    """
    K = in_features
    n_out = 0 if outlier_idx is None else outlier_idx.numel()
    if (outlier_idx is None) != (outlier_weight is None):
        raise LowbitError("pack_quik: outlier_idx and outlier_weight come together (both or neither)")
    Kq = K - n_out
    if not 1 <= Kq <= MAX_K:
        raise LowbitError(f"pack_quik: the kept columns (in_features {K} - {n_out} outliers) must number "
                          f"1..{MAX_K}, got {Kq}")
    N = qweight.shape[0]
    if scales.ndim != 2 or scales.shape[1] != 1:
        raise LowbitError(f"the W4A4 kernel takes per-channel weights, scales (N, 1); got {tuple(scales.shape)}: "
                          "group-wise int4 weights stay on the reference path")
    dev = qweight.device
    weight = pack_for_kernels(qweight, scales, None, None, Kq, tile_k=tile_k)  # checks dtypes and shapes
    w_sum = unpack_int4(qweight, Kq, signed=True).sum(1, dtype=torch.int64).to(torch.int32)
    keep = torch.ones(K, dtype=torch.bool, device=dev)
    out_idx = torch.zeros(0, dtype=torch.long, device=dev)
    ow = None
    if n_out:
        out_idx = outlier_idx.to(dev, torch.long)
        if out_idx.ndim != 1 or out_idx[0] < 0 or out_idx[-1] >= K or (out_idx[1:] <= out_idx[:-1]).any():
            raise LowbitError(f"pack_quik: outlier_idx must be distinct ascending columns in [0, {K})")
        keep[out_idx] = False
        odt = dtype or outlier_weight.dtype
        if outlier_weight.shape != (N, n_out) or odt not in _FLOAT:
            raise LowbitError(f"pack_quik: outlier_weight must be fp16/bf16 ({N}, {n_out}), got "
                              f"{outlier_weight.dtype} {tuple(outlier_weight.shape)}; pass dtype= to cast it")
        out_k = 16 if n_out <= 16 else 32 if n_out <= 32 else 64
        ow = torch.zeros(N, -(-n_out // out_k) * out_k, dtype=odt, device=dev)
        ow[:, :n_out] = outlier_weight.to(dev, odt)
    else:
        out_k = 16
    if smooth is not None and (smooth.shape != (K,) or smooth.dtype != torch.float32):
        raise LowbitError(f"pack_quik: smooth must be fp32 ({K},), got {smooth.dtype} {tuple(smooth.shape)}")
    kept = keep.nonzero().squeeze(1)
    src = torch.full((weight.Kp,), -1, dtype=torch.int32, device=dev)
    src[:Kq] = kept.to(torch.int32)
    g_smooth = o_smooth = None
    if smooth is not None:
        smooth = smooth.to(dev)
        s = torch.ones(weight.Kp, dtype=torch.float32, device=dev)
        s[:Kq] = smooth[kept]
        g_smooth, o_smooth = _tile_order(s, tile_k), (smooth[out_idx].contiguous() if n_out else None)
    return PackedQuik(
        weight=weight, w_sum=w_sum.contiguous(), kept_idx=kept, gather_idx=_tile_order(src, tile_k),
        gather_smooth=g_smooth, outlier_idx=out_idx, outlier_src=out_idx.to(torch.int32),
        outlier_smooth=o_smooth, outlier_weight=ow, smooth=smooth, in_features=K, out_k=out_k,
    )


class QuikActivations(NamedTuple):
    """What ``split_quantize`` writes for x (M, K).

    codes    (M, Kqp/2) uint8, offset int4 codes u = q + 8 in the tile-interleaved order (padding 8)
    scales   (M,) fp32 per-token scales (absmax / 7 of the kept columns, at least 1e-12)
    sums     (M,) int32, sum of u over all Kqp columns (padding included)
    outliers (M, n_out) x's dtype: the outlier columns, divided by the smoothing factors
    """

    codes: torch.Tensor
    scales: torch.Tensor
    sums: torch.Tensor
    outliers: torch.Tensor


# ---- 1. split and quantize ----------------------------------------------------------------------

@triton.jit
def _split_quant_kernel(
    x_ptr, gidx_ptr, gsm_ptr, oidx_ptr, osm_ptr, q_ptr, s_ptr, sum_ptr, xo_ptr,
    NB, n_out, stride_xm, stride_qm, stride_om,
    HAS_SMOOTH: tl.constexpr, HAS_OUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr,
    QMAX: tl.constexpr, ROUND: tl.constexpr, PDL: tl.constexpr = False,
):
    start_small(PDL)  # PDL (lowbit.kernels.pdl): the GEMM after this launches now, the kernel before has completed
    row = tl.program_id(0).to(tl.int64)
    rb = tl.arange(0, BLOCK_B)
    ok = rb < NB
    x_row = x_ptr + row * stride_xm
    # the gather: each packed byte's two source columns (-1: padding, value 0, code 8)
    src_lo = tl.load(gidx_ptr + rb, mask=ok, other=-1)
    src_hi = tl.load(gidx_ptr + NB + rb, mask=ok, other=-1)
    lo = tl.load(x_row + src_lo, mask=src_lo >= 0, other=0.0).to(tl.float32)
    hi = tl.load(x_row + src_hi, mask=src_hi >= 0, other=0.0).to(tl.float32)
    if HAS_SMOOTH:  # IEEE divisions (div_rn), as the reference's x / smooth
        lo = tl.math.div_rn(lo, tl.load(gsm_ptr + rb, mask=ok, other=1.0))
        hi = tl.math.div_rn(hi, tl.load(gsm_ptr + NB + rb, mask=ok, other=1.0))
    absmax = tl.maximum(tl.max(tl.abs(lo), axis=0), tl.max(tl.abs(hi), axis=0))
    scale = tl.maximum(tl.math.div_rn(absmax, QMAX), 1e-12)
    # offset codes u = q + 8 (1..15), the weights' convention: int8 MMA operands with one AND / shift
    q_lo = tl.minimum(tl.maximum((tl.math.div_rn(lo, scale) + ROUND) - ROUND, -QMAX), QMAX).to(tl.int32) + 8
    q_hi = tl.minimum(tl.maximum((tl.math.div_rn(hi, scale) + ROUND) - ROUND, -QMAX), QMAX).to(tl.int32) + 8
    tl.store(q_ptr + row * stride_qm + rb, (q_lo | (q_hi << 4)).to(tl.uint8), mask=ok)
    tl.store(s_ptr + row, scale)
    tl.store(sum_ptr + row, tl.sum(tl.where(ok, q_lo + q_hi, 0), axis=0))
    if HAS_OUT:
        ro = tl.arange(0, BLOCK_O)
        o_ok = ro < n_out
        xo = tl.load(x_row + tl.load(oidx_ptr + ro, mask=o_ok, other=0), mask=o_ok, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            xo = tl.math.div_rn(xo, tl.load(osm_ptr + ro, mask=o_ok, other=1.0))
        tl.store(xo_ptr + row * stride_om + ro, xo.to(xo_ptr.dtype.element_ty), mask=o_ok)


@dataclass(frozen=True)
class SplitConfig:
    """Launch configuration of ``split_quantize``: warps per token row (None: from the row length)."""

    num_warps: int | None = None

    def __post_init__(self) -> None:
        if self.num_warps not in (None, 1, 2, 4, 8, 16):
            raise LowbitError(f"SplitConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")


def split_quantize(x: torch.Tensor, p: PackedQuik, config: SplitConfig | None = None) -> QuikActivations:
    """x (M, K) fp16/bf16 -> ``QuikActivations`` (packed int4 codes, scales, code sums, outliers)."""
    check_activation(x, p.in_features, _FLOAT, "w4a4")
    if p.n_out and x.dtype != p.dtype:
        raise LowbitError(f"w4a4: x is {x.dtype} but the outlier weights are {p.dtype}; "
                          f"pack the layer with pack_quik(..., dtype={x.dtype})")
    x = x.contiguous()
    M, NB = x.shape[0], p.weight.Kp // 2
    codes = torch.empty(M, NB, dtype=torch.uint8, device=x.device)
    scales = torch.empty(M, dtype=torch.float32, device=x.device)
    sums = torch.empty(M, dtype=torch.int32, device=x.device)
    outliers = torch.empty(M, p.n_out, dtype=x.dtype, device=x.device)
    block = next_power_of_2(NB)
    warps = (config or SplitConfig()).num_warps or max(1, min(16, block // 512))
    if M:
        triton_launch(_split_quant_kernel, (M,),
            # unused pointers get a live tensor: an empty one may have a null data pointer
            x, p.gather_idx, p.gather_smooth if p.gather_smooth is not None else scales,
            p.outlier_src if p.n_out else p.gather_idx, p.outlier_smooth if p.outlier_smooth is not None else scales,
            codes, scales, sums, outliers if p.n_out else scales,
            NB, p.n_out, x.stride(0), codes.stride(0), max(1, p.n_out),
            HAS_SMOOTH=p.gather_smooth is not None, HAS_OUT=p.n_out > 0, BLOCK_B=block,
            BLOCK_O=next_power_of_2(max(1, p.n_out)), QMAX=QMAX, ROUND=_ROUND, num_warps=warps,
            **launch_options(x.device),
        )
    return QuikActivations(codes, scales, sums, outliers)


# ---- 2. the GEMM --------------------------------------------------------------------------------

@triton.jit
def _pair_sum(wvec, xvec, SWAP: tl.constexpr):
    """wvec (N,) plus xvec (M,) laid out like the accumulator."""
    if SWAP:
        out = wvec[:, None] + xvec[None, :]
    else:
        out = xvec[:, None] + wvec[None, :]
    return out


@triton.jit
def _w4a4_kernel(
    xq_ptr, xs_ptr, xsum_ptr, xo_ptr, w_ptr, s_ptr, wsum_ptr, wo_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, n_tiles, n_out, n_otiles,
    stride_xm, stride_xom, stride_wn, stride_won, stride_ym,
    HAS_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr,
    HALF_K: tl.constexpr, OUT_K: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF_K)
    # clamped rows instead of load masks (lowbit.kernels.w4a16): rows past M, N are never stored, and
    # both operands are padded to whole tiles, so the int4 loop needs no mask at all
    rm_ld = tl.minimum(rm, M - 1)
    rn_ld = tl.minimum(rn, N - 1)
    w_row = w_ptr + rn_ld[:, None] * stride_wn + rj[None, :]
    x_row = xq_ptr + rm_ld[:, None] * stride_xm + rj[None, :]
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    wait(PDL)  # PDL: split_quantize before this kernel has completed
    for t in range(pid_k, n_tiles, SPLIT_K):
        b = tl.load(w_row + t * HALF_K)
        a = tl.load(x_row + t * HALF_K)
        # offset nibbles (0..15) are int8 operands as they are: one AND / one shift per byte
        acc = _mma(nibbles_int8(b, False, ASM), nibbles_int8(a, False, ASM), acc, SWAP, tl.int32)
        acc = _mma(nibbles_int8(b, True, ASM), nibbles_int8(a, True, ASM), acc, SWAP, tl.int32)
    # sum (u_a - 8)(u_w - 8) = sum u_a u_w - 8 (S_a + S_w), exact in int32; split 0 adds it once
    first = (pid_k == 0).to(tl.int32)
    corr = _pair_sum(tl.load(wsum_ptr + rn_ld), tl.load(xsum_ptr + rm_ld), SWAP)
    acc = acc - (8 * first) * corr
    out_f = acc.to(tl.float32) * _outer(tl.load(s_ptr + rn_ld).to(tl.float32), tl.load(xs_ptr + rm_ld), SWAP)
    if HAS_OUT:
        # QUIK's fp16 outlier columns: fp16/bf16 MMA into the same fp32 accumulator (only one live),
        # tiles dealt from the last split so that split 0 does not carry them on top of its int4 tiles
        ro = tl.arange(0, OUT_K)
        wo_row = wo_ptr + rn_ld[:, None] * stride_won + ro[None, :]
        xo_row = xo_ptr + rm_ld[:, None] * stride_xom + ro[None, :]
        for o in range(SPLIT_K - 1 - pid_k, n_otiles, SPLIT_K):
            k0 = o * OUT_K
            wo = tl.load(wo_row + k0)  # zero-padded to whole tiles by pack_quik
            xo = tl.load(xo_row + k0, mask=k0 + ro[None, :] < n_out, other=0.0)
            out_f = _mma(wo, xo, out_f, SWAP, tl.float32)
    if SWAP:
        out_f = tl.trans(out_f)  # (BLOCK_M, BLOCK_N)
    store_tile(out_f, rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, stride_ym, HAS_BIAS, SPLIT_K)


def default_config(M: int, N: int, Kq: int, device: torch.device) -> TileConfig:
    """Hopper heuristic (``lowbit.kernels.dispatch.default_choice``): swapped split-K tiles at M <= 64,
    128 x 128 tiles on the INT8 tensor cores above. The tuner replaces it per (M, N, K)."""
    from lowbit.kernels.dispatch import default_choice

    return default_choice("w4a4", M, N, Kq, sm_count(device, 8)).config


def w4a4_matmul(
    acts: QuikActivations,
    p: PackedQuik,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """``split_quantize``'s output times the layer ``p`` -> (M, N) ``out_dtype`` (fp16 / bf16).

    bias (N,) or None. ``config``: tiles, split-K, warps, stages, orientation (default
    ``default_config``); its ``block_k`` is ignored (one step is one packed tile of ``tile_k``).
    """
    codes, xs, xsum, xo = acts
    M = codes.shape[0]
    if codes.dtype != torch.uint8 or codes.shape != (M, p.weight.Kp // 2):
        raise LowbitError(f"w4a4: packed activations must be uint8 ({M}, {p.weight.Kp // 2}) for this layer, got "
                          f"{codes.dtype} {tuple(codes.shape)}; quantize them with split_quantize(x, p)")
    if xs.shape != (M,) or xs.dtype != torch.float32 or xsum.shape != (M,) or xsum.dtype != torch.int32:
        raise LowbitError("w4a4: activation scales must be fp32 (M,) and code sums int32 (M,)")
    if xo.shape != (M, p.n_out) or (p.n_out and xo.dtype != p.dtype):
        raise LowbitError(f"w4a4: outlier activations must be {p.dtype} ({M}, {p.n_out}), got {xo.dtype} "
                          f"{tuple(xo.shape)}")
    if out_dtype not in _FLOAT:
        raise LowbitError(f"w4a4: out_dtype must be fp16 or bf16, got {out_dtype}")
    N = p.N
    if bias is not None and bias.shape != (N,):
        raise LowbitError(f"w4a4: bias must be ({N},), got {tuple(bias.shape)}")
    y = torch.empty(M, N, dtype=out_dtype, device=codes.device)
    if M == 0:
        return y
    cfg = config or default_config(M, N, p.Kq, codes.device)
    grid = (cdiv(M, cfg.block_m), cdiv(N, cfg.block_n), cfg.split_k)
    ws, locks = reserve(codes.device, M * N if cfg.split_k > 1 else 0, grid[0] * grid[1] if cfg.split_k > 1 else 0)
    w = p.weight
    ow = p.outlier_weight
    triton_launch(_w4a4_kernel, grid,
        codes, xs, xsum, xo if p.n_out else xs, w.qweight, w.scales, p.w_sum, ow if ow is not None else xs,
        bias if bias is not None else xs, y, ws, locks,
        M, N, w.Kp // w.tile_k, p.n_out, 0 if ow is None else ow.shape[1] // p.out_k,
        codes.stride(0), max(1, p.n_out), w.qweight.stride(0), 0 if ow is None else ow.stride(0), y.stride(0),
        HAS_OUT=p.n_out > 0, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, SWAP=cfg.swap,
        HALF_K=w.half, OUT_K=p.out_k, ASM=USE_ASM, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **launch_options(codes.device),
    )
    return y


def quik_matmul(
    x: torch.Tensor,
    p: PackedQuik,
    bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
    split_config: SplitConfig | None = None,
) -> torch.Tensor:
    """x (M, K) fp16/bf16 -> (M, N) in x's dtype: ``split_quantize`` then ``w4a4_matmul``.

    ``config`` is the GEMM's ``TileConfig``, ``split_config`` the split-and-quantize kernel's.
    """
    return w4a4_matmul(split_quantize(x, p, split_config), p, x.dtype, bias, config)


# ---- references (fp32, from lowbit.numerics.primitives) ----------------------------------------------

def split_quantize_reference(x: torch.Tensor, p: PackedQuik) -> QuikActivations:
    """What ``split_quantize`` must write, bit for bit."""
    xf = x.float() if p.smooth is None else x.float() / p.smooth
    q, s = quantize_activation(xf[:, p.kept_idx], 4, "int")  # (M, Kq) int8, (M, 1) fp32
    u = torch.full((x.shape[0], p.weight.Kp), OFFSET, dtype=torch.int32, device=x.device)
    u[:, : p.Kq] = q.to(torch.int32) + OFFSET
    codes = _interleave(u.to(torch.uint8), p.weight.tile_k)
    return QuikActivations(codes, s[:, 0], u.sum(1, dtype=torch.int32), xf[:, p.outlier_idx].to(x.dtype))


def w4a4_reference(
    acts: QuikActivations, p: PackedQuik, out_dtype: torch.dtype, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What ``w4a4_matmul`` computes, in fp32: the exact integer product scaled as the kernel scales
    it (acc * (w_scale * x_scale)), plus the outlier product of the same fp16/bf16 numbers."""
    w = p.weight
    as_layer = PackedInt4(acts.codes, w.scales, None, None, w.K, tile_k=w.tile_k)
    qa = unpack_kernel_codes(as_layer).float() - OFFSET  # (M, Kq)
    qw = unpack_kernel_codes(w).float() - OFFSET  # (N, Kq)
    y = (qa @ qw.t()) * (w.scales[0].float()[None, :] * acts.scales[:, None])  # integer-valued: exact in fp32
    if p.n_out:
        y = y + acts.outliers.float() @ p.outlier_weight[:, : p.n_out].float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def quik_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    in_features: int,
    outlier_idx: torch.Tensor | None = None,
    outlier_weight: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole QUIK layer from its checkpoint buffers, fp32 math, in x's dtype: x (..., K) -> (..., N).

    The same operations, in the same order, as ``QuantLinear.forward``'s reference path for a
    per-channel int4 layer with 4-bit activations (the library's numerical spec).
    """
    n_out = 0 if outlier_idx is None else outlier_idx.numel()
    Kq = in_features - n_out
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth
    y = None
    if n_out:
        keep = torch.ones(in_features, dtype=torch.bool, device=x.device)
        keep[outlier_idx] = False
        y = xf[..., outlier_idx] @ outlier_weight.float().t()
        xf = xf[..., keep.nonzero().squeeze(1)]
    xq = fake_quantize_activation(xf, ActivationFormat(bits=4))
    wfmt = WeightFormat(bits=4, group_size=None, method="rtn")
    w = dequantize_weight(unpack_int4(qweight, Kq, signed=True), scales, None, wfmt)
    out = xq @ w.t()
    if y is not None:
        out = out + y
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
