"""2:4-sparse W4A16 GEMM (the Sparse-MARLIN / QUIK format) in Triton: y = x @ W^T (+ bias).

W (N out x K in) is symmetric int4 with fp16 group scales (preset ``w4a16-2:4``: group 128, GPTQ with
SparseGPT pruning) and 2:4 sparse: in every group of 4 consecutive input columns of a row at most 2
codes are non-zero. x is (M, K) fp16 or bf16.

Hardware. Hopper has no INT4 tensor cores (``mma.sync`` s4 measured at 52 TOPS, emulated, against 1194
for s8: ../shared/PERF.md), so, as in ``lowbit.kernels.w4a16``, the int4 weights are expanded in
registers to fp16/bf16 operands and the dense 16-bit tensor cores run ``tl.dot`` with fp32
accumulation. Hopper also has *sparse* tensor cores (``mma.sp`` / sparse ``wgmma``: the MMA reads only
the 2 kept values of every 4 plus 2-bit metadata, so half the operand traffic). They are **not
reachable from Triton** (checked for Triton 3.6, the version lowbit runs): ``tl.dot`` has no
metadata operand and ``triton.language`` no sparse dot; Gluon's Hopper API offers only dense
``warpgroup_mma`` / ``mma_v2``; the only ``mma.sp`` strings in ``libtriton.so`` are Blackwell's
``tcgen05.mma.sp`` inside the bundled LLVM backend, not exposed to kernels. The maintainers answered
"we currently don't" (triton-lang/triton#1277); 2:4 support is an open request (#6891) and an
AMD-only draft (#6714); OpenXLA's fork has a ``triton_xla.sparse_dot`` that is not upstream.
``tl.inline_asm_elementwise`` cannot emit an MMA either: it sees elements, not warp fragments. So
this kernel expands the zeros back in registers, does the same MMA work as the dense kernel, and
**wins only bytes** (below).

Layout (``PackedSparse24``, built once at load time by ``pack_sparse24``): one byte stream per row.
A tile of T dense columns (T = ``tile_k``, 128 or 256) is T/4 groups of 4 columns and 3T/8 bytes:
- T/4 **value bytes**, one per group: the first kept code in the low nibble, the second in the high
  nibble, as 4-bit two's complement (the checkpoint's own nibble encoding);
- T/8 **pattern bytes**: byte j holds the pattern of group j in its low nibble and of group T/8 + j
  in its high nibble, i.e. the low nibbles describe the tile's first half (columns 0..T/2-1), the
  high nibbles its second half, the ``lowbit.kernels.layout`` trick that lets ``& 0xF`` / ``>> 4``
  pair bytes with a contiguous half-tile and needs no shuffle. A pattern is the index in
  ``PATTERNS`` of the two kept positions (pos0 < pos1, 2 bits each): 6 possible pairs, so bit 3 is
  always 0, which ``prmt`` needs (below). Groups with fewer than 2 non-zeros keep code 0 at their
  lowest free positions, so both positions are always valid and distinct.
K is padded to whole tiles with zero codes (pattern 0); ``scales`` are (G, N), as in ``PackedInt4``.

Bytes per weight, group 128 (scales 16 bits per 128 weights):

    dense int4 (PackedInt4)   4 bits + 0.125 = 4.125 bits = 0.516 B
    this layout               2 bits of values (4 bits for half the weights)
                              + 1 bit of patterns (4 bits per group of 4) + 0.125 = 3.125 bits = 0.391 B
    ratio                     3.125 / 4.125 = 0.758  (-24%: 60.6 -> 45.9 MB for 28672 x 4096)

At equal bandwidth efficiency that caps the speed-up over the dense W4A16 kernel at 1 / 0.758 = 1.32x.
Even an ideal code for the positions (log2(6) = 2.585 bits per group, 2.77 bits per weight) caps it
at 1.49x, so the 1.5x target cannot come from bytes alone: it needs the dense kernel to stay further
from its roofline than this one (it is issue-bound today: docs/kernels.md), or the sparse MMA above.

Expansion, with no cross-lane shuffle. A half tile (HG = T/8 groups, 4*HG columns) becomes 4 operands
d_c (c = 0..3) of shape (BLOCK_N, HG): d_c[n, j] is the weight at column 4j + c, i.e. the first kept
value where pos0 == c, the second where pos1 == c, else 0. Each d_c meets the activation columns
4j + c, which come from one contiguous (BLOCK_M, 4*HG) load split into its 4 column phases by
``reshape`` + ``split``, which should stay inside each thread's registers since a thread's 16-byte
load holds whole runs of 4 columns (not yet checked in the compiled TTGIR). So no value moves between
lanes, on either side. 4 dots of K = HG cost the MMA what 1 dot
of K = 4*HG does: the same MMA work as the dense kernel.
On the GPU the expansion is inline PTX (``expansion_asm``), 4 groups (16 output weights) per call,
elementwise (output i reads only input byte i): ``prmt`` looks the patterns up in two 8-byte tables
of byte selectors, ``prmt`` then gathers each output column's code from the (first, second) kept
nibbles, with the zero from ``prmt``'s sign-replication mode on a byte < 0x80, and one ``lop3`` per
two outputs makes ``(code ^ 8) | 0x6400`` = 1032 + q in fp16 (0x4300: 136 + q in bf16), as the dense
kernel's magic number does. 31 instructions per 16 weights (1.9 per weight; plus 4 moves of table
constants that ptxas can hoist) against 1.25 per weight for the dense unpack (``lowbit.kernels.unpack``). Under ``TRITON_INTERPRET`` the same numbers come from
plain Triton ops (``tl.where`` on the positions).

Scales, as in ``lowbit.kernels.w4a16`` (``scale_mode`` with a half tile = 4*HG columns): per channel
on the accumulator at the end; a group that is a multiple of the half tile: each half's 4 dots go into
a fresh fp32 partial that is scaled and accumulated; smaller groups (32/64 with T = 256): the operands
are scaled per group of 4 columns (a group of 4 never straddles two scale groups). Split-K
(``lowbit.kernels.splitk``) for small M; ``TileConfig.swap`` as in the dense kernel.

Numerics: ``sparse24_reference`` (decompress, ``lowbit.numerics.primitives.dequantize_weight``, fp32
matmul), which equals ``QuantLinear.forward``'s reference path. The MMA products q * x are exact
(|q| <= 8), accumulation is fp32, the scale is applied in fp32 (per-column mode: rounded to x's dtype).
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
from lowbit.kernels.launch import cdiv, triton_launch
from lowbit.kernels.pdl import launch_options, wait
from lowbit.kernels.splitk import reserve, store_tile
from lowbit.kernels.unpack import USE_ASM, nibbles_float
from lowbit.kernels.w4a8 import _mma, _scale_w
from lowbit.kernels.w4a16 import _MAGIC, check_activation, scale_mode
from lowbit.numerics.primitives import dequantize_weight, num_groups, unpack_int4

TILE_K = 256  # dense columns per tile: a half (128 columns) is one group-128 scale group
TILE_CHOICES = (128, 256)
# the 6 ways to keep 2 of 4 positions; a group's pattern nibble is an index into this tuple
PATTERNS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
# pos0 / pos1 of every pattern as 2-bit fields of one constant: pos0 = (_POS0 >> 2 * pattern) & 3
_POS0 = tl.constexpr(sum(p0 << 2 * i for i, (p0, _) in enumerate(PATTERNS)))
_POS1 = tl.constexpr(sum(p1 << 2 * i for i, (_, p1) in enumerate(PATTERNS)))


def _pattern_of_mask(mask: int) -> int:
    """The pattern that keeps the non-zero positions of a 4-bit mask (bit c: column c non-zero), filled
    up with the lowest free positions; 0 for masks with more than 2 bits (rejected before use)."""
    nonzero = [c for c in range(4) if mask >> c & 1]
    if len(nonzero) > 2:
        return 0
    kept = sorted(nonzero + [c for c in range(4) if c not in nonzero][: 2 - len(nonzero)])
    return PATTERNS.index((kept[0], kept[1]))


_PATTERN_OF_MASK = [_pattern_of_mask(m) for m in range(16)]


# ---- layout (plain PyTorch: runs anywhere) ----------------------------------------------------

@dataclass
class PackedSparse24:
    """2:4-sparse symmetric int4 weights (N out x K in) in the kernel layout (module docstring)."""

    data: torch.Tensor  # (N, 3 * Kp // 8) uint8: per tile, T/4 value bytes then T/8 pattern bytes
    scales: torch.Tensor  # (G, N) fp16
    group_size: int | None  # None = per output channel (G = 1)
    K: int  # logical input features, a multiple of 4
    tile_k: int = TILE_K  # dense columns per tile (T)

    @property
    def N(self) -> int:
        return self.data.shape[0]

    @property
    def Kp(self) -> int:
        return self.data.shape[1] * 8 // 3

    @property
    def half_groups(self) -> int:
        """HG: groups of 4 columns per half tile (the K of each of the kernel's dots)."""
        return self.tile_k // 8

    def nbytes(self) -> int:
        """Bytes a GEMM must read for the weights (values + patterns + scales)."""
        return self.data.numel() + self.scales.numel() * 2


def _check_2of4(codes: torch.Tensor) -> None:
    """Raise a LowbitError naming the first group of 4 columns with more than 2 non-zero codes."""
    N, K = codes.shape
    count = (codes != 0).reshape(N, K // 4, 4).sum(-1)
    bad = (count > 2).nonzero()
    if len(bad):
        r, g = (int(v) for v in bad[0])
        raise LowbitError(
            f"weights are not 2:4 sparse: row {r}, input columns {4 * g}..{4 * g + 3} hold {int(count[r, g])} "
            f"non-zero codes ({len(bad)} such groups; at most 2 of every 4 consecutive columns may be non-zero). "
            "Quantize with WeightFormat(sparsity='2:4') (SparseGPT, preset w4a16-2:4), or use the dense "
            "W4A16 kernel (lowbit.kernels.w4a16)")


def pack_sparse24(
    qweight: torch.Tensor, scales: torch.Tensor, K: int, group_size: int | None, tile_k: int = TILE_K
) -> PackedSparse24:
    """Compress checkpoint-layout 2:4 int4 weights into ``PackedSparse24``.

    qweight (N, ceil(K/2)) uint8: ``lowbit.numerics.primitives.pack_int4`` of signed codes (symmetric
    formats only); scales (N, G) fp16; K a multiple of 4. Raises a LowbitError if a row has more
    than 2 non-zero codes in some group of 4 columns.
    """
    if tile_k not in TILE_CHOICES:
        raise LowbitError(f"2:4 kernel tile must be one of {TILE_CHOICES}, got {tile_k}")
    if K <= 0 or K % 4:
        raise LowbitError(f"2:4 sparsity groups input columns by 4: K must be a positive multiple of 4, got {K}")
    if qweight.ndim != 2 or qweight.dtype != torch.uint8 or qweight.shape[1] != (K + 1) // 2:
        raise LowbitError(f"2:4 qweight must be uint8 (N, {(K + 1) // 2}) (pack_int4 of signed codes), "
                          f"got {qweight.dtype} {tuple(qweight.shape)}")
    N, G = qweight.shape[0], num_groups(K, group_size)
    if scales.dtype != torch.float16 or scales.shape != (N, G):
        raise LowbitError(f"2:4 scales must be fp16 ({N}, {G}), got {scales.dtype} {tuple(scales.shape)}")
    codes = unpack_int4(qweight, K, signed=True)
    _check_2of4(codes)
    dev = qweight.device
    # int8 / int16 temporaries and one int64 table index (about 5 bytes per weight at the peak, like
    # pack_for_kernels): this runs on the GPU at load time for layers of up to 470 M weights
    q = codes.view(N, K // 4, 4)
    nz = (q != 0).to(torch.uint8)
    mask = nz[..., 0] | nz[..., 1] << 1 | nz[..., 2] << 2 | nz[..., 3] << 3  # (N, K/4) uint8
    pattern = torch.tensor(_PATTERN_OF_MASK, dtype=torch.uint8, device=dev)[mask.long()]
    del nz, mask
    table = torch.tensor(PATTERNS, dtype=torch.uint8, device=dev)  # (6, 2)
    cols = torch.arange(4, dtype=torch.uint8, device=dev)
    idx = pattern.long()
    kept = [torch.where(table[idx, i, None] == cols, q, 0).sum(-1, dtype=torch.int16) & 0xF for i in (0, 1)]
    del idx
    Kp = -(-K // tile_k) * tile_k
    n_tiles, hg = Kp // tile_k, tile_k // 8
    values = torch.zeros(N, Kp // 4, dtype=torch.uint8, device=dev)  # padding: code 0, pattern 0
    pats = torch.zeros(N, Kp // 4, dtype=torch.uint8, device=dev)
    values[:, : K // 4] = (kept[0] | (kept[1] << 4)).to(torch.uint8)  # 4-bit two's complement nibbles
    pats[:, : K // 4] = pattern
    pats = pats.view(N, n_tiles, 2, hg)
    meta = pats[:, :, 0] | (pats[:, :, 1] << 4)  # (N, n_tiles, hg): low nibble first half, high second
    data = torch.cat([values.view(N, n_tiles, 2 * hg), meta], dim=2).reshape(N, 3 * Kp // 8)
    return PackedSparse24(data.contiguous(), scales.t().contiguous(), group_size, K, tile_k)


def unpack_sparse24(w: PackedSparse24) -> torch.Tensor:
    """Decompress: (N, K) int8 signed codes, zeros included (the inverse of ``pack_sparse24``)."""
    N, n_tiles, hg = w.N, w.Kp // w.tile_k, w.half_groups
    t = w.data.view(N, n_tiles, 3 * hg)
    vb = t[:, :, : 2 * hg].reshape(N, -1).to(torch.int16)  # (N, Kp/4)
    meta = t[:, :, 2 * hg:]
    pattern = torch.stack([meta & 0xF, meta >> 4], dim=2).reshape(N, -1)
    if int(pattern.max()) >= len(PATTERNS):
        raise LowbitError("corrupt 2:4 layout: a pattern nibble is >= 6; rebuild it with pack_sparse24")
    pos = torch.tensor(PATTERNS, dtype=torch.uint8, device=w.data.device)[pattern.long()]  # (N, Kp/4, 2)
    nib = torch.stack([vb & 0xF, vb >> 4], dim=-1)
    kept = torch.where(nib >= 8, nib - 16, nib)  # (N, Kp/4, 2) int16
    cols = torch.arange(4, dtype=torch.uint8, device=w.data.device)
    dense = (pos[..., :1] == cols) * kept[..., :1] + (pos[..., 1:] == cols) * kept[..., 1:]
    return dense.reshape(N, w.Kp)[:, : w.K].to(torch.int8)


def dequantize_sparse24(w: PackedSparse24) -> torch.Tensor:
    """(N, K) fp32 weights: decompressed codes times their group's scale (``dequantize_weight``)."""
    fmt = WeightFormat(bits=4, group_size=w.group_size, method="rtn")
    return dequantize_weight(unpack_sparse24(w), w.scales.t(), None, fmt)


def sparse24_reference(x: torch.Tensor, w: PackedSparse24, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The numerical spec: x (M, K) fp16/bf16/fp32 @ W^T in fp32 (+ bias (N,)) -> (M, N) in x's dtype."""
    out = x.float() @ dequantize_sparse24(w).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# ---- the expansion in PTX ------------------------------------------------------------------------

def _selector_tables() -> tuple[int, int, int, int]:
    """Two 8-byte tables (as 4 words) of ``prmt`` selector pairs, indexed by pattern.

    For pattern k and column c the selector nibble is 0 (first kept nibble), 4 (second kept nibble)
    or 8 (sign-replicate a byte < 0x80: zero); table A holds columns (0, 1), table B columns (2, 3),
    as the low and high nibble of entry k. Entries 6 and 7 are never read.
    """
    def entry(k: int, cols: tuple[int, int]) -> int:
        if k >= len(PATTERNS):
            return 0x88
        p0, p1 = PATTERNS[k]
        sel = [0 if c == p0 else 4 if c == p1 else 8 for c in cols]
        return sel[0] | sel[1] << 4

    words = []
    for cols in ((0, 1), (2, 3)):
        table = [entry(k, cols) for k in range(8)]
        words += [sum(b << 8 * i for i, b in enumerate(table[:4])), sum(b << 8 * i for i, b in enumerate(table[4:]))]
    return words[0], words[1], words[2], words[3]


def expansion_asm(hi: bool, fp16: bool) -> str:
    """PTX: 4 value bytes ($8) and 4 pattern bytes ($9) -> d_0..d_3, 2 registers each ($0..$7).

    Output register 2c + p holds, as two fp16 (bf16) numbers, d_c of groups 2p and 2p + 1 of the
    four: BASE + (code ^ 8) with BASE 1024 (128), code the kept nibble at column c or 0. ``hi``: the
    patterns are the high nibbles (second half tile). Checked on the CPU by an interpreter of these
    six instructions (tests/test_sparse24_kernels.py).
    """
    magic = (0x64006400 if fp16 else 0x43004300) | 0x00080008  # lop3 0x6A: (a & b) ^ c
    ta0, ta1, tb0, tb1 = _selector_tables()
    lines = [
        "{ .reg .b32 vl, vh, pm, ta0, ta1, tb0, tb1, ya, yb, sw, r1, r2;",
        "and.b32 vl, $8, 0x0F0F0F0F;",  # byte i: first kept nibble of group i
        "shr.b32 vh, $8, 4;",
        "and.b32 vh, vh, 0x0F0F0F0F;",  # byte i: second kept nibble
        f"mov.b32 ta0, {ta0:#010x};", f"mov.b32 ta1, {ta1:#010x};",
        f"mov.b32 tb0, {tb0:#010x};", f"mov.b32 tb1, {tb1:#010x};",
        # nibble 2i: pattern of group i (odd nibbles are the other half's: selectors never use them)
        "shr.b32 pm, $9, 4;" if hi else "mov.b32 pm, $9;",
    ]
    # groups (0, 1) then (2, 3); the OR adds each group's byte index to its selectors (X + i, X in {0, 4, 8})
    for pair, offset in ((0, 0x11001100), (1, 0x33223322)):
        if pair:
            lines.append("shr.b32 pm, pm, 16;")
        lines += [
            "prmt.b32 ya, ta0, ta1, pm;",  # bytes 0, 2: table A at the two groups' patterns
            "prmt.b32 yb, tb0, tb1, pm;",
            "prmt.b32 sw, ya, yb, 0x6420;",  # nibbles: a0 a1 b0 b1 a2 a3 b2 b3 (group a, b; column)
            f"or.b32 sw, sw, {offset:#010x};",
            "prmt.b32 r1, vl, vh, sw;",  # bytes: code(a,0) code(a,1) code(b,0) code(b,1)
            "shr.b32 sw, sw, 16;",
            "prmt.b32 r2, vl, vh, sw;",  # bytes: code(a,2) code(a,3) code(b,2) code(b,3)
            f"lop3.b32 ${0 + pair}, r1, 0x000F000F, {magic:#010x}, 0x6A;",
            "shr.b32 r1, r1, 8;",
            f"lop3.b32 ${2 + pair}, r1, 0x000F000F, {magic:#010x}, 0x6A;",
            f"lop3.b32 ${4 + pair}, r2, 0x000F000F, {magic:#010x}, 0x6A;",
            "shr.b32 r2, r2, 8;",
            f"lop3.b32 ${6 + pair}, r2, 0x000F000F, {magic:#010x}, 0x6A;",
        ]
    return "\n".join(lines + ["}"])


_OUTS = tl.constexpr("=r,=r,=r,=r,=r,=r,=r,=r,r,r")
_F16_LO, _F16_HI = tl.constexpr(expansion_asm(False, True)), tl.constexpr(expansion_asm(True, True))
_BF16_LO, _BF16_HI = tl.constexpr(expansion_asm(False, False)), tl.constexpr(expansion_asm(True, False))


@triton.jit
def expand_sparse24(vb, mb, HI: tl.constexpr, IS_FP16: tl.constexpr, BASE: tl.constexpr, ASM: tl.constexpr):
    """Value bytes and pattern bytes (BLOCK_N, HG) uint8 -> d_0..d_3, each BASE + 8 + weight code."""
    if ASM:
        if IS_FP16:
            if HI:
                d0, d1, d2, d3 = tl.inline_asm_elementwise(
                    _F16_HI, _OUTS, [vb, mb], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                    is_pure=True, pack=4)
            else:
                d0, d1, d2, d3 = tl.inline_asm_elementwise(
                    _F16_LO, _OUTS, [vb, mb], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                    is_pure=True, pack=4)
        else:
            if HI:
                d0, d1, d2, d3 = tl.inline_asm_elementwise(
                    _BF16_HI, _OUTS, [vb, mb], dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                    is_pure=True, pack=4)
            else:
                d0, d1, d2, d3 = tl.inline_asm_elementwise(
                    _BF16_LO, _OUTS, [vb, mb], dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                    is_pure=True, pack=4)
    else:
        if HI:
            k = (mb >> 4).to(tl.int32)
        else:
            k = (mb & 0xF).to(tl.int32)
        pos0 = (_POS0 >> (2 * k)) & 3
        pos1 = (_POS1 >> (2 * k)) & 3
        vx = vb ^ 0x88  # two's complement nibble n -> n ^ 8 = q + 8, what the PTX path's lop3 makes
        f0 = nibbles_float(vx, False, IS_FP16, False)
        f1 = nibbles_float(vx, True, IS_FP16, False)
        zero = tl.full(f0.shape, BASE + 8.0, f0.dtype)
        d0 = tl.where(pos0 == 0, f0, tl.where(pos1 == 0, f1, zero))
        d1 = tl.where(pos0 == 1, f0, tl.where(pos1 == 1, f1, zero))
        d2 = tl.where(pos0 == 2, f0, tl.where(pos1 == 2, f1, zero))
        d3 = tl.where(pos0 == 3, f0, tl.where(pos1 == 3, f1, zero))
    return d0, d1, d2, d3


# ---- the kernel ----------------------------------------------------------------------------------

@triton.jit
def _half_tile(
    acc, vb, mb, x_row, col0, K, s_ptr, rn_ld, N, group_size, last_group,
    HI: tl.constexpr, SCALE_MODE: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr,
    HG: tl.constexpr, IS_FP16: tl.constexpr, BASE: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr,
):
    """acc + the product of one half tile: dense columns col0 .. col0 + 4 * HG - 1."""
    DT = x_row.dtype.element_ty
    rq = tl.arange(0, 4 * HG)
    if EVEN_K:
        xt = tl.load(x_row + col0)
    else:
        xt = tl.load(x_row + col0, mask=col0 + rq[None, :] < K, other=0.0)
    # (BLOCK_M, 4 HG) -> column phases c = 2a + b, all inside each thread's registers
    x_even, x_odd = tl.split(tl.reshape(xt, (BLOCK_M, HG, 2, 2)))
    x0, x2 = tl.split(x_even)
    x1, x3 = tl.split(x_odd)
    d0, d1, d2, d3 = expand_sparse24(vb, mb, HI, IS_FP16, BASE, ASM)
    off = tl.full((1, 1), BASE + 8.0, DT)
    w0, w1, w2, w3 = d0 - off, d1 - off, d2 - off, d3 - off  # exact: the codes q
    if SCALE_MODE == 2:
        # groups 32 / 64: one scale per group of 4 columns (never split by a scale group)
        rj = tl.arange(0, HG)
        g = tl.minimum((col0 + 4 * rj) // group_size, last_group)
        s = tl.load(s_ptr + g[None, :] * N + rn_ld[:, None]).to(DT)
        w0, w1, w2, w3 = w0 * s, w1 * s, w2 * s, w3 * s
    if SCALE_MODE == 1:
        # the half lies in one scale group: an fp32 partial of its 4 dots, scaled once
        part = _mma(w0, x0, tl.zeros(acc.shape, dtype=tl.float32), SWAP, tl.float32)
        part = _mma(w1, x1, part, SWAP, tl.float32)
        part = _mma(w2, x2, part, SWAP, tl.float32)
        part = _mma(w3, x3, part, SWAP, tl.float32)
        s1 = tl.load(s_ptr + tl.minimum(col0 // group_size, last_group) * N + rn_ld).to(tl.float32)
        acc += _scale_w(part, s1, SWAP)
    else:
        acc = _mma(w0, x0, acc, SWAP, tl.float32)
        acc = _mma(w1, x1, acc, SWAP, tl.float32)
        acc = _mma(w2, x2, acc, SWAP, tl.float32)
        acc = _mma(w3, x3, acc, SWAP, tl.float32)
    return acc


@triton.jit
def _sparse24_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, n_tiles, group_size,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, SCALE_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr,
    HG: tl.constexpr, IS_FP16: tl.constexpr, BASE: tl.constexpr, ASM: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HG)
    n_ok = rn < N
    # clamped rows instead of load masks, as in lowbit.kernels.w4a16 (rows past M, N are not stored)
    rn_ld = tl.minimum(rn, N - 1)
    w_row = w_ptr + rn_ld[:, None] * stride_wn + rj[None, :]
    x_row = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm + tl.arange(0, 4 * HG)[None, :]
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    last_group = (K - 1) // group_size
    wait(PDL)  # PDL (lowbit.kernels.pdl): the kernel before this one has completed
    for t in range(pid_k, n_tiles, SPLIT_K):
        tile = w_row + t * (3 * HG)  # K is padded to whole tiles in PackedSparse24
        vb_lo = tl.load(tile)
        vb_hi = tl.load(tile + HG)
        mb = tl.load(tile + 2 * HG)
        col0 = t * (8 * HG)
        acc = _half_tile(acc, vb_lo, mb, x_row, col0, K, s_ptr, rn_ld, N, group_size, last_group,
                         False, SCALE_MODE, SWAP, BLOCK_M, HG, IS_FP16, BASE, ASM, EVEN_K)
        acc = _half_tile(acc, vb_hi, mb, x_row, col0 + 4 * HG, K, s_ptr, rn_ld, N, group_size, last_group,
                         True, SCALE_MODE, SWAP, BLOCK_M, HG, IS_FP16, BASE, ASM, EVEN_K)
    if SWAP:
        acc = tl.trans(acc)  # (BLOCK_M, BLOCK_N)
    if SCALE_MODE == 0:
        acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    store_tile(acc, rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, stride_ym, HAS_BIAS, SPLIT_K)


@triton.jit
def _widen_half(vb, mb, col0, rn, rn_ld, s_ptr, out_ptr, N, K, group_size, last_group, stride_on,
                HI: tl.constexpr, HG: tl.constexpr, IS_FP16: tl.constexpr, BASE: tl.constexpr, ASM: tl.constexpr):
    """Store one half tile of dense dequantized weights: columns col0 .. col0 + 4 * HG - 1."""
    DT = out_ptr.dtype.element_ty
    d0, d1, d2, d3 = expand_sparse24(vb, mb, HI, IS_FP16, BASE, ASM)
    off = tl.full((1, 1), BASE + 8.0, DT)
    rj = tl.arange(0, HG)
    g = tl.minimum((col0 + 4 * rj) // group_size, last_group)  # a group of 4 columns never spans two scales
    s = tl.load(s_ptr + g[None, :] * N + rn_ld[:, None]).to(tl.float32)
    w0 = ((d0 - off).to(tl.float32) * s).to(DT)
    w1 = ((d1 - off).to(tl.float32) * s).to(DT)
    w2 = ((d2 - off).to(tl.float32) * s).to(DT)
    w3 = ((d3 - off).to(tl.float32) * s).to(DT)
    # column 4j + 2a + b holds w_(2a+b): the inverse of the activation split in _half_tile
    dense = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (rn.shape[0], 4 * HG))
    cols = col0 + tl.arange(0, 4 * HG)
    tl.store(out_ptr + rn[:, None] * stride_on + cols[None, :], dense, mask=(rn[:, None] < N) & (cols[None, :] < K))


@triton.jit
def _widen24_kernel(w_ptr, s_ptr, out_ptr, N, K, group_size, stride_wn, stride_on,
                    BLOCK_N: tl.constexpr, HG: tl.constexpr, IS_FP16: tl.constexpr, BASE: tl.constexpr,
                    ASM: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    rn_ld = tl.minimum(rn, N - 1)
    tile = w_ptr + rn_ld[:, None] * stride_wn + t * (3 * HG) + tl.arange(0, HG)[None, :]
    mb = tl.load(tile + 2 * HG)
    last_group = (K - 1) // group_size
    col0 = t * (8 * HG)
    _widen_half(tl.load(tile), mb, col0, rn, rn_ld, s_ptr, out_ptr, N, K, group_size, last_group, stride_on,
                False, HG, IS_FP16, BASE, ASM)
    _widen_half(tl.load(tile + HG), mb, col0 + 4 * HG, rn, rn_ld, s_ptr, out_ptr, N, K, group_size, last_group,
                stride_on, True, HG, IS_FP16, BASE, ASM)


def widen_sparse24(w: PackedSparse24, dtype: torch.dtype, asm: bool | None = None) -> torch.Tensor:
    """(N, K) dense fp16 / bf16 weights (zeros included) from the 2:4 layout, in one kernel launch.

    For large M, where an fp16 GEMM on cuBLAS beats expanding the same tile for every row block (the
    same trade as ``lowbit.kernels.widen`` for dense int4): widening costs N x K x 2.4 bytes of
    traffic, small against an M >= 128 GEMM. Values: codes times scale in fp32, rounded to ``dtype``
    (``dequantize_sparse24`` rounded). ``asm`` as in ``sparse24_matmul``.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise LowbitError(f"widen_sparse24 makes fp16 or bf16 weights, not {dtype}")
    asm = USE_ASM if asm is None else asm
    out = torch.empty(w.N, w.K, dtype=dtype, device=w.data.device)
    block_n = 64  # 64 x tile_k / 8 >= 128 x 4 warps: 4 groups per thread for the PTX expansion
    grid = (cdiv(w.N, block_n), w.Kp // w.tile_k)
    triton_launch(_widen24_kernel, grid, w.data, w.scales, out, w.N, w.K, w.group_size or w.K, w.data.stride(0), out.stride(0),
                          BLOCK_N=block_n, HG=w.half_groups, **_MAGIC[dtype], ASM=asm, num_warps=4)
    return out


def default_config(M: int, N: int, K: int, sms: int = 132, tile_k: int = TILE_K) -> TileConfig:
    """A Hopper-minded default (the tuner may sweep ``TileConfig`` instead): at M <= 64, swapped tiles
    (W fills the MMA's 64-row side) and split-K until about two programs per SM; big tiles above."""
    if M <= 64:
        block_n = 64 if M <= 16 else 128
        tiles = math.ceil(N / block_n)
        split = max(1, min(16, round(2 * sms / tiles), math.ceil(K / tile_k)))
        return TileConfig(block_m=max(16, 1 << (M - 1).bit_length()), block_n=block_n, split_k=split,
                          num_warps=4, num_stages=4, swap=True)
    return TileConfig(block_m=128, block_n=128, num_warps=8, num_stages=3)


def sparse24_matmul(
    x: torch.Tensor,
    w: PackedSparse24,
    bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
    asm: bool | None = None,
) -> torch.Tensor:
    """x (M, K) fp16 or bf16 -> (M, N) in x's dtype; ``w`` from ``pack_sparse24``; bias (N,) or None.

    ``config``: launch configuration (``TileConfig.block_k`` is ignored: the loop steps by one layout
    tile); default ``default_config``. ``asm``: expand with the PTX sequence (default: on the GPU) or
    with plain Triton ops (the interpreter's path; the same numbers, slower).
    """
    if not isinstance(w, PackedSparse24):
        raise LowbitError(f"sparse24_matmul takes a PackedSparse24 from pack_sparse24, got {type(w).__name__}")
    check_activation(x, w.K, (torch.float16, torch.bfloat16), "sparse24")
    if x.device != w.data.device:
        raise LowbitError(f"sparse24: x is on {x.device} but the weights are on {w.data.device}; move one of them")
    if bias is not None and bias.shape != (w.N,):
        raise LowbitError(f"sparse24: bias must be ({w.N},), got {tuple(bias.shape)}")
    if asm is None:
        asm = USE_ASM
    elif asm and not USE_ASM:
        raise LowbitError("sparse24: the PTX expansion needs a GPU; Triton's interpreter (TRITON_INTERPRET=1) "
                          "runs the plain path (asm=None or False)")
    M, N = x.shape[0], w.N
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    if config is None:
        config = default_config(M, N, w.K, sm_count(x.device, 132), w.tile_k)
    cfg = config
    if cfg.block_n * w.half_groups < 128 * cfg.num_warps:
        # inline_asm_elementwise(pack=4) needs 4 byte elements per thread, or Triton aborts compiling
        raise LowbitError(f"sparse24: block_n ({cfg.block_n}) x tile_k / 8 ({w.half_groups}) must be >= 128 x "
                          f"num_warps ({cfg.num_warps}) so that each thread expands 4 groups; raise block_n or "
                          "lower num_warps")
    x = x.contiguous()
    grid = (cdiv(M, cfg.block_m), cdiv(N, cfg.block_n), cfg.split_k)
    ws, locks = reserve(x.device, M * N if cfg.split_k > 1 else 0, grid[0] * grid[1] if cfg.split_k > 1 else 0)
    triton_launch(_sparse24_kernel, grid,
        x, w.data, w.scales, bias if bias is not None else w.scales, y, ws, locks,
        M, N, w.K, w.Kp // w.tile_k, w.group_size or w.K,
        x.stride(0), w.data.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, SCALE_MODE=scale_mode(w.group_size, w.tile_k // 2),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, SWAP=cfg.swap, HG=w.half_groups,
        **_MAGIC[x.dtype], ASM=asm, EVEN_K=w.K % w.tile_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x.device),
    )
    return y
