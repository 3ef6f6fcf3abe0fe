"""int4-weight GEMMs on Hopper's wgmma behind a cp.async ring of shared-memory stages (Gluon; issue 18).

Two formats share one kernel: W4A16 (fp16 or bf16 activations and MMA) and W4A8 with int8
activations (int8 MMA, 2x the fp16 rate on Hopper: ../shared/PERF.md). The first Gluon design
(``w4a16_wgmma.py``) prefetched only one K step, in registers, and measured 0.2-0.96x of cuBLAS fp16
on the H200 at M = 32-256 (docs/kernels.md): one step of loads in flight per program cannot cover
the global-memory latency. Here:

- ``STAGES`` K steps of packed weights and activations are in flight at once, copied by ``cp.async``
  into a ring of shared-memory slots (the activations into wgmma's swizzled ``NVMMASharedLayout``);
- each step reads its packed weight tile from shared memory straight into the MMA's register
  operand layout (wgmma's "RS" form, as Machete and CUTLASS's mixed-input GEMMs use), converts the
  nibbles there with inline PTX, and issues the step's MMAs asynchronously;
- ``warpgroup_mma_wait(2)`` keeps that step's two MMAs in flight while it waits for the previous
  step's, whose slot the next ``cp.async`` then overwrites; the conversion of step t + 1 so runs
  under step t's MMAs. Two K steps per loop iteration, or ptxas serializes the wgmmas (C7515);
- split-K (``SPLIT_K`` programs per output tile, fp32 partials meeting in ``lowbit.kernels.splitk``'s
  workspace) fills the SMs when there are few output tiles (the 8B down projection at M = 32: 64).

The weights come as ``PackedInt4`` (128-column tiles) or, faster, as ``FragmentInt4``: the same bytes
in the register operand's order, read 16 bytes per thread (``lowbit.kernels.layout``). On the H200,
W4A16 g128 on FragmentInt4 measured 1.5-1.7x cuBLAS fp16 at M = 32 and 0.6-0.8x at M = 128-256
(docs/kernels.md, "Hopper wgmma kernels"); the H200 table runs W4A16 on it.

The output is computed transposed, Y^T (BLOCK_N x BLOCK_M) = W (BLOCK_N x K) @ X^T: weight rows fill
wgmma's 64-row M side, activation rows its N side (16-256).

Numerics, against ``lowbit.kernels.reference``: W4A16, ``(u - zero) * scale`` rounded to the
activation dtype with group scales (as Marlin and exllama fold them into the operand; bf16 rounds the
fp16 scale too) or ``(u - zero)`` exact with the per-channel scale on the fp32 accumulator, fp32
accumulation. W4A8 int8 (per channel): the unsigned codes u exact in int8, exact int32 accumulation,
``zero * sum(x)`` subtracted in int32 and both scales applied in the fp32 epilogue.
"""

from __future__ import annotations

import torch

from lowbit.device import sm_count
from lowbit.errors import LowbitError
from lowbit.kernels.config import TileConfig
from lowbit.kernels.launch import cdiv, triton_launch
from lowbit.kernels.layout import FRAG_BASES, FragmentInt4, PackedInt4
from lowbit.kernels.splitk import reserve
from lowbit.kernels.unpack import I8_HI_ASM, I8_LO_ASM
from lowbit.kernels.w4a16 import check_activation
from lowbit.requirements import require_triton

require_triton()
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

_HALF = 64  # columns per tile half (layout.TILE_K = 128: low nibbles, then high nibbles)
HALF = gl.constexpr(_HALF)


def _float_asm(hi: bool, grouped: bool, bf16: bool) -> str:
    """Four packed bytes ($2) -> four 16-bit weights ($0, $1: elements 0-1 and 2-3) of their low or
    high nibbles: the bytes reordered (0, 2, 1, 3) so each half lines up with its own byte (the
    operation stays elementwise, as inline_asm_elementwise requires), BASE + u by mask-and-exponent
    (``lowbit.kernels.unpack``: BASE 1024 in fp16, 128 in bf16), minus BASE + zero ($3, $4) exactly,
    times the group scale ($5, $6) with one rounding; x2 instructions throughout (Triton's own code
    for the subtraction and the product after an asm block was scalar, twice the instructions)."""
    s0, s1 = (4, 12) if hi else (0, 8)
    t, pattern = ("bf16x2", "0x43004300") if bf16 else ("f16x2", "0x64006400")
    lines = ["{ .reg .b32 t, u;", "prmt.b32 t, $2, 0, 0x3120;"]
    for out, shift, z, sc in (("$0", s0, "$3", "$5"), ("$1", s1, "$4", "$6")):
        lines += [f"shr.b32 u, t, {shift};", f"lop3.b32 u, u, 0x000F000F, {pattern}, 0xEA;"]
        lines += [f"sub.rn.{t} u, u, {z};", f"mul.rn.{t} {out}, u, {sc};"] if grouped else [f"sub.rn.{t} {out}, u, {z};"]
    return "\n".join(lines + ["}"])


# (hi, grouped) -> asm, fp16 and bf16 (constexpr: a @gluon.jit function may only read globals that are)
_F16 = {(h, g): gl.constexpr(_float_asm(h, g, False)) for h in (False, True) for g in (False, True)}
_BF16 = {(h, g): gl.constexpr(_float_asm(h, g, True)) for h in (False, True) for g in (False, True)}
_F16_LO, _F16_HI, _F16_LO_G, _F16_HI_G = _F16[(False, False)], _F16[(True, False)], _F16[(False, True)], _F16[(True, True)]
_BF16_LO, _BF16_HI = _BF16[(False, False)], _BF16[(True, False)]
_BF16_LO_G, _BF16_HI_G = _BF16[(False, True)], _BF16[(True, True)]


@gluon.jit
def _asm16(b, z, sc, HI: gl.constexpr, GROUPED: gl.constexpr, BF16: gl.constexpr):
    """One nibble half of packed bytes b as 16-bit (u - zero) [* scale] (_float_asm)."""
    if GROUPED:
        if BF16:
            out = gl.inline_asm_elementwise(_BF16_HI_G if HI else _BF16_LO_G, "=r,=r,r,r,r,r,r", [b, z, sc],
                                            dtype=gl.bfloat16,
                                            is_pure=True, pack=4)
        else:
            out = gl.inline_asm_elementwise(_F16_HI_G if HI else _F16_LO_G, "=r,=r,r,r,r,r,r", [b, z, sc],
                                            dtype=gl.float16,
                                            is_pure=True, pack=4)
    else:
        if BF16:
            out = gl.inline_asm_elementwise(_BF16_HI if HI else _BF16_LO, "=r,=r,r,r,r", [b, z], dtype=gl.bfloat16,
                                            is_pure=True, pack=4)
        else:
            out = gl.inline_asm_elementwise(_F16_HI if HI else _F16_LO, "=r,=r,r,r,r", [b, z], dtype=gl.float16,
                                            is_pure=True, pack=4)
    return out


@gluon.jit
def _convert(b, z_lo, z_hi, s_lo, s_hi, INT8: gl.constexpr, GROUPED: gl.constexpr):
    """Packed bytes (BLOCK_N, 64) uint8, in the MMA operand layout -> the two halves' operands.

    Four bytes per few instructions of inline PTX (``lowbit.kernels.unpack``; Triton lowers uint8
    elementwise ops a byte at a time: 3x the instructions, measured in this kernel's PTX)."""
    if INT8:  # the unsigned nibbles u as int8; the zero point comes off in the epilogue (z * sum(x))
        lo = gl.inline_asm_elementwise(I8_LO_ASM, "=r,r", [b], dtype=gl.int8, is_pure=True, pack=4)
        hi = gl.inline_asm_elementwise(I8_HI_ASM, "=r,r", [b], dtype=gl.int8, is_pure=True, pack=4)
    else:
        # (u - zero) [* group scale] in fp16 / bf16 (z_*, s_* in that dtype), four weights per asm block
        BF16: gl.constexpr = z_lo.dtype == gl.bfloat16
        BASE: gl.constexpr = 128.0 if BF16 else 1024.0
        zl = gl.broadcast(z_lo[:, None] + BASE, b)[0]
        zh = gl.broadcast(z_hi[:, None] + BASE, b)[0]
        sl = gl.broadcast(s_lo[:, None], b)[0]
        sh = gl.broadcast(s_hi[:, None], b)[0]
        lo = _asm16(b, zl, sl, False, GROUPED, BF16)
        hi = _asm16(b, zh, sh, True, GROUPED, BF16)
    return lo, hi


@gluon.jit
def _group_params(s_ptr, z_ptr, k, rn, N, group_size, last_group, zdt: gl.constexpr, HAS_ZEROS: gl.constexpr):
    """Scales and zero points of the two halves of the tile starting at column k, per weight row."""
    g_lo = gl.minimum(k // group_size, last_group)
    g_hi = gl.minimum((k + HALF) // group_size, last_group)
    s_lo = gl.load(s_ptr + g_lo * N + rn).to(zdt)  # fp16 scales: rounded to bf16 for a bf16 operand
    s_hi = gl.load(s_ptr + g_hi * N + rn).to(zdt)
    z_lo = gl.full(rn.shape, 8, zdt, layout=rn.type.layout)
    z_hi = z_lo
    if HAS_ZEROS:
        z_lo = gl.load(z_ptr + g_lo * N + rn).to(zdt)
        z_hi = gl.load(z_ptr + g_hi * N + rn).to(zdt)
    return s_lo, s_hi, z_lo, z_hi


@gluon.jit
def _issue(w_s, xl_s, xh_s, slot, t, n_tiles, w_row, x_row, rk, m_ok, K, HALF_C: gl.constexpr, W_STEP: gl.constexpr,
           TPS: gl.constexpr):
    """cp.async of tiles t .. t + TPS - 1 (one copy group): packed weights (BLOCK_N x 64 bytes; ``W_STEP``
    bytes per tile along a copy row) and activation halves (BLOCK_M, 64), into ring slot ``slot``
    (buffers slot * TPS + j). A tile past the last reads the last one's weights and zero activations."""
    for j in gl.static_range(TPS):
        k = (t + j) * (2 * HALF_C)
        cp.async_copy_global_to_shared(w_s.index(slot * TPS + j), w_row + gl.minimum(t + j, n_tiles - 1) * W_STEP)
        cp.async_copy_global_to_shared(xl_s.index(slot * TPS + j), x_row + k, mask=m_ok & (k + rk[None, :] < K))
        cp.async_copy_global_to_shared(xh_s.index(slot * TPS + j), x_row + k + HALF_C,
                                       mask=m_ok & (k + HALF_C + rk[None, :] < K))
    cp.commit_group()


@gluon.jit
def _step(acc, buf, land, issue_slot, issue_t, next_k, n_tiles, w_s, xl_s, xh_s, w_row, x_row, rk, m_ok, K, s_ptr,
          z_ptr, rn, N, group_size, last_group, s_lo, s_hi, z_lo, z_hi, a_op: gl.constexpr, zdt: gl.constexpr,
          INT8: gl.constexpr, GROUPED: gl.constexpr, HAS_ZEROS: gl.constexpr, W_FRAG: gl.constexpr,
          W_STEP: gl.constexpr, TPS: gl.constexpr, STAGES: gl.constexpr, LAND: gl.constexpr, ISSUE: gl.constexpr):
    """One K tile: convert the tile in shared-memory buffer ``buf``, issue its MMAs, and once they are
    in flight retire the tile before it. ``LAND``: first wait for the copy group holding the tile.
    ``ISSUE``: then copy the group of tiles ``issue_t`` into ring slot ``issue_slot`` (whose tiles the
    retired MMAs read last). Fetches the group scales of the tile at column ``next_k``."""
    if LAND:
        cp.wait_group(STAGES - 2)  # the group has landed (this thread's copies) ...
        gl.thread_barrier()  # ... and every thread's
    if W_FRAG is None:
        b = w_s.index(buf).load(a_op)
    else:  # fragment order (FragmentInt4): the same bytes seen as (BLOCK_N, 64), 16-32 contiguous per thread
        b = w_s.index(buf)._reinterpret(gl.uint8, [rn.shape[0], HALF], W_FRAG).load(a_op)
    w_lo, w_hi = _convert(b, z_lo, z_hi, s_lo, s_hi, INT8, GROUPED)
    fence_async_shared()  # cp.async wrote the activation tiles through the generic proxy; wgmma reads async
    acc = warpgroup_mma(w_lo, xl_s.index(buf).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(w_hi, xh_s.index(buf).permute((1, 0)), acc, is_async=True)
    # the tile before's MMAs are done after this. Only the accumulator is a dependency: ptxas keeps the
    # register operands of in-flight MMAs itself (passing them through the wait, which Triton 3.6
    # refuses for 8-bit tensors, made it serialize every wgmma: C7515)
    acc = warpgroup_mma_wait(num_outstanding=2, deps=(acc,))
    if ISSUE:
        _issue(w_s, xl_s, xh_s, issue_slot, issue_t, n_tiles, w_row, x_row, rk, m_ok, K, HALF, W_STEP, TPS)
    if GROUPED:
        s_lo, s_hi, z_lo, z_hi = _group_params(s_ptr, z_ptr, next_k, rn, N, group_size, last_group, zdt, HAS_ZEROS)
    return acc, s_lo, s_hi, z_lo, z_hi


@gluon.jit
def _mixed_wgmma_kernel(
    x_ptr, xs_ptr, sx_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, n_tiles, tiles_per_split, group_size, stride_xm, stride_wn, stride_ym,
    INT8: gl.constexpr, HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, GROUPED: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SPLIT_K: gl.constexpr,
    W_FRAG: gl.constexpr, TPS: gl.constexpr, num_warps: gl.constexpr,
):
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    pid_k = gl.program_id(2)
    op_dt: gl.constexpr = gl.int8 if INT8 else x_ptr.dtype.element_ty
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 32 if INT8 else 16])
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4 if INT8 else 2)
    # copies: 16 contiguous bytes per thread (8 fp16 or 16 int8 activations, 16 packed weight bytes)
    XV: gl.constexpr = 16 if INT8 else 8
    x_ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, XV], threads_per_warp=[32 // (HALF // XV), HALF // XV],
                                          warps_per_cta=[num_warps, 1], order=[1, 0])
    w_ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[8, 4],
                                          warps_per_cta=[num_warps, 1], order=[1, 0])
    x_sh: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HALF], op_dt)
    # packed weights: a 64-byte row per weight row, read in the operand layout 2 bytes (fp16) or 4
    # (int8) per thread, 8 rows per instruction; unswizzled, rows r and r + 2 share banks (4-way
    # conflicts). XOR-ing 8-byte chunks with the row (fp16) spreads the 8 rows over distinct banks;
    # int8 XORs 16-byte chunks (2-way): with 8-byte ones ptxas serialized its wgmmas (C7515)
    w_sh: gl.constexpr = gl.SwizzledSharedLayout(vec=16 if INT8 else 8, per_phase=1, max_phase=4 if INT8 else 8,
                                                 order=[1, 0])
    if W_FRAG is None:
        W_STEP: gl.constexpr = HALF
        w_s = gl.allocate_shared_memory(gl.uint8, [STAGES * TPS, BLOCK_N, HALF], w_sh)
    else:
        # fragment order: each 16-row group's tile is 1024 contiguous bytes, copied as they lie
        W_STEP: gl.constexpr = 1024
        w_fl: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[1, 32],
                                              warps_per_cta=[num_warps, 1], order=[1, 0])
        w_s = gl.allocate_shared_memory(gl.uint8, [STAGES * TPS, BLOCK_N // 16, 1024],
                                        gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
    # the ring: STAGES slots of TPS tiles (one copy group each)
    xl_s = gl.allocate_shared_memory(op_dt, [STAGES * TPS, BLOCK_M, HALF], x_sh)
    xh_s = gl.allocate_shared_memory(op_dt, [STAGES * TPS, BLOCK_M, HALF], x_sh)

    # this program's K tiles [t0, t0 + n): tiles_per_split is a multiple of TPS
    t0 = pid_k * tiles_per_split
    n = gl.minimum(n_tiles - t0, tiles_per_split)
    n_groups = (n + TPS - 1) // TPS  # copy groups of TPS tiles (a last group past the end: zero x)
    # copy addresses: weight rows past N repeat the last (never stored); activations past M or K load 0
    if W_FRAG is None:
        rn_w = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_ld)), N - 1)
        w_row = w_ptr + rn_w[:, None] * stride_wn + gl.arange(0, HALF, layout=gl.SliceLayout(0, w_ld))[None, :]
    else:  # stride_wn: bytes per 16-row group (n_tiles x 1024); groups past the last repeat it
        g = gl.minimum(pid_n * (BLOCK_N // 16) + gl.arange(0, BLOCK_N // 16, layout=gl.SliceLayout(1, w_fl)),
                       (N - 1) // 16)
        w_row = w_ptr + g[:, None] * stride_wn + gl.arange(0, 1024, layout=gl.SliceLayout(0, w_fl))[None, :]
    rm_x = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_ld))
    rk = gl.arange(0, HALF, layout=gl.SliceLayout(0, x_ld))
    x_row = x_ptr + rm_x[:, None] * stride_xm + rk[None, :]
    m_ok = rm_x[:, None] < M

    rows: gl.constexpr = gl.SliceLayout(1, a_op)
    rn = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=rows), N - 1)
    zdt: gl.constexpr = op_dt
    s_lo = gl.full([BLOCK_N], 1.0, gl.float16 if INT8 else op_dt, layout=rows)  # per channel: in the epilogue
    s_hi = s_lo
    z_lo = gl.full([BLOCK_N], 8, zdt, layout=rows)  # symmetric: the implicit 8
    if HAS_ZEROS and not GROUPED and not INT8:  # int8: in the epilogue
        z_lo = gl.load(z_ptr + rn).to(zdt)
    z_hi = z_lo
    # K here is x's width (a multiple of 16, _launch): padding columns past the layer's K load x = 0 and
    # borrow the last group, which they never leave (groups are multiples of 64 columns)
    last_group = (K - 1) // group_size

    # prologue: STAGES - 1 copy groups in flight (groups past this split's end re-copy its last one, unused)
    for s in gl.static_range(STAGES - 1):
        _issue(w_s, xl_s, xh_s, s, t0 + gl.minimum(s, n_groups - 1) * TPS, n_tiles, w_row, x_row, rk, m_ok, K, HALF,
               W_STEP, TPS)
    if GROUPED:
        s_lo, s_hi, z_lo, z_hi = _group_params(s_ptr, z_ptr, t0 * 2 * HALF, rn, N, group_size, last_group, zdt,
                                               HAS_ZEROS)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.int32 if INT8 else gl.float32, layout=mma)
    # two K tiles per iteration: each tile's register operand then has registers of its own, so the
    # next tile's conversion never writes registers an in-flight MMA reads; with one tile per
    # iteration ptxas serializes every wgmma (C7515). TPS = 1: one copy group per tile (an odd count
    # peels one first); TPS = 2: one copy group, one wait and one barrier per iteration's two tiles.
    if TPS == 1:
        if n % 2 == 1:
            acc, s_lo, s_hi, z_lo, z_hi = _step(
                acc, 0, 0, (STAGES - 1) % STAGES, t0 + gl.minimum(STAGES - 1, n - 1), (t0 + gl.minimum(1, n - 1)) * 2 * HALF,
                n_tiles, w_s, xl_s, xh_s, w_row, x_row, rk, m_ok, K, s_ptr, z_ptr, rn, N, group_size, last_group,
                s_lo, s_hi, z_lo, z_hi, a_op, zdt, INT8, GROUPED, HAS_ZEROS, W_FRAG, W_STEP, TPS, STAGES, True, True)
        for i in range(n % 2, n, 2):
            for d in gl.static_range(2):
                acc, s_lo, s_hi, z_lo, z_hi = _step(
                    acc, (i + d) % STAGES, 0, (i + d + STAGES - 1) % STAGES, t0 + gl.minimum(i + d + STAGES - 1, n - 1),
                    (t0 + gl.minimum(i + d + 1, n - 1)) * 2 * HALF, n_tiles, w_s, xl_s, xh_s, w_row, x_row, rk, m_ok,
                    K, s_ptr, z_ptr, rn, N, group_size, last_group, s_lo, s_hi, z_lo, z_hi, a_op, zdt, INT8,
                    GROUPED, HAS_ZEROS, W_FRAG, W_STEP, TPS, STAGES, True, True)
    else:
        for c in range(0, n_groups):
            slot = c % STAGES
            nxt = gl.minimum(c + STAGES - 1, n_groups - 1)
            # the first tile lands the group; the second, once the first's MMAs are in flight and the
            # group before's retired, refills that group's slot
            acc, s_lo, s_hi, z_lo, z_hi = _step(
                acc, slot * 2, 0, 0, 0, (t0 + 2 * c + 1) * 2 * HALF, n_tiles, w_s, xl_s, xh_s, w_row, x_row, rk,
                m_ok, K, s_ptr, z_ptr, rn, N, group_size, last_group, s_lo, s_hi, z_lo, z_hi, a_op, zdt, INT8,
                GROUPED, HAS_ZEROS, W_FRAG, W_STEP, TPS, STAGES, True, False)
            acc, s_lo, s_hi, z_lo, z_hi = _step(
                acc, slot * 2 + 1, 0, (c + STAGES - 1) % STAGES, t0 + nxt * 2,
                (t0 + 2 * gl.minimum(c + 1, n_groups - 1)) * 2 * HALF, n_tiles, w_s, xl_s, xh_s, w_row, x_row, rk,
                m_ok, K, s_ptr, z_ptr, rn, N, group_size, last_group, s_lo, s_hi, z_lo, z_hi, a_op, zdt, INT8,
                GROUPED, HAS_ZEROS, W_FRAG, W_STEP, TPS, STAGES, False, True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    cp.wait_group(0)

    # epilogue: acc is Y^T (rows n, columns m). y's contiguous axis is n, so the tile moves (through
    # shared memory) to a layout of 4 consecutive n per thread: 8- or 16-byte stores and vector atomics
    # instead of the MMA layout's scattered 2-byte ones, and a quarter of the addresses
    TN: gl.constexpr = BLOCK_N // 4 if BLOCK_N < 128 else 32
    o_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[4, 1], threads_per_warp=[TN, 32 // TN],
                                         warps_per_cta=[1, num_warps], order=[0, 1])
    out = gl.convert_layout(acc, o_l).to(gl.float32)  # INT8 rebuilds it below
    rn_o = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, o_l))
    rm_o = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, o_l))
    n_ok = rn_o < N
    m_o = rm_o < M
    if INT8:
        # x . (u - z) = x . u - z * sum(x), exact in int32 (OdysseyLLM's FastGEMM does the same)
        zc = gl.full([BLOCK_N], 8, gl.int32, layout=gl.SliceLayout(1, o_l))
        if HAS_ZEROS:
            zc = gl.load(z_ptr + rn_o, mask=n_ok, other=0).to(gl.int32)
        sx = gl.load(sx_ptr + rm_o, mask=m_o, other=0)
        if SPLIT_K > 1:  # subtracted once, by the first split
            sx = gl.where(pid_k == 0, sx, 0)
        out = gl.convert_layout(acc, o_l) - zc[:, None] * sx[None, :]
        out = out.to(gl.float32) * gl.load(xs_ptr + rm_o, mask=m_o, other=0.0)[None, :]
    if not GROUPED:
        out = out * gl.load(s_ptr + rn_o, mask=n_ok, other=0.0).to(gl.float32)[:, None]
    if HAS_BIAS:
        bias = gl.load(b_ptr + rn_o, mask=n_ok, other=0.0).to(gl.float32)
        if SPLIT_K == 1:
            out = out + bias[:, None]
        else:  # added once, by the first split
            out = out + gl.where(pid_k == 0, bias, 0.0)[:, None]
    offs = rm_o[None, :] * stride_ym + rn_o[:, None]
    mask = n_ok[:, None] & m_o[None, :]
    if SPLIT_K == 1:
        gl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # lowbit.kernels.splitk.finish, written for this kernel's layouts: partials meet in the
        # workspace, the last program of the tile writes y and leaves zeros behind
        gl.atomic_add(ws_ptr + offs, out, mask=mask, sem="relaxed")
        gl.thread_barrier()
        lock = lock_ptr + pid_m * gl.num_programs(1) + pid_n
        count = gl.atomic_add(lock, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            total = gl.atomic_add(ws_ptr + offs, gl.zeros_like(out), mask=mask, sem="relaxed")
            gl.store(ws_ptr + offs, gl.zeros_like(out), mask=mask)
            gl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=mask)
            gl.store(lock, 0)


def _frag_layout(int8: bool, block_n: int):
    """The (block_n, 64) view of a block's fragment-ordered bytes in shared memory, for the kernel."""
    groups = [(16 << i, 0) for i in range((block_n // 16).bit_length() - 1)]
    return gl.SharedLinearLayout(offset_bases=[list(b) for b in FRAG_BASES[int8]] + [list(b) for b in groups])


def mixed_wgmma_takes(w: PackedInt4, int8: bool = False) -> bool:
    """Whether the kernel takes these weights: no act-order, 128-column tiles, groups of a multiple of
    64 columns (or per channel); the int8 variant per channel only."""
    if w.perm is not None or w.tile_k != 2 * _HALF:
        return False
    if isinstance(w, FragmentInt4) and w.int8 != int8:
        return False
    if int8:
        return w.group_size is None
    return w.group_size is None or w.group_size % _HALF == 0


def default_wgmma_config(M: int, N: int, K: int, sms: int) -> TileConfig:
    """A starting tile: block_m the smallest power of two >= M (32-128), 128 weight rows on 8 warps,
    4 stages, split-K to about two programs per SM."""
    bm = min(128, max(32, 1 << (max(M, 1) - 1).bit_length()))
    tiles = cdiv(M, bm) * cdiv(N, 128)
    split = max(1, min(8, (2 * sms) // max(tiles, 1), cdiv(K, 128) // 4))
    return TileConfig(block_m=bm, block_n=128, num_warps=8, num_stages=4, split_k=split)


def wgmma_candidates(M: int, N: int, K: int, sms: int, stages: tuple[int, ...] = (4,)) -> list[TileConfig]:
    """Tiles worth timing at this M (bench/tune_kernels.py, bench/wgmma_sweep.py): block_m the smallest
    power of two >= M (16-128) and down to a quarter of it, 64 weight rows on 4 warps or 128 / 256 on 8
    (the H200 sweep's winners, docs/kernels.md), each without split-K and with the default's split."""
    top = min(128, max(16, 1 << (max(M, 1) - 1).bit_length()))
    out = []
    for bm in (16, 32, 64, 128):
        if bm > top or bm * 4 < top:
            continue
        for bn, warps in ((64, 4), (128, 8), (256, 8)):
            split = default_wgmma_config(min(M, bm), N * 128 // bn, K, sms).split_k
            for st in stages:
                for sk in sorted({1, split}):
                    out.append(TileConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=st, split_k=sk))
            if bm <= 64:  # two tiles per slot: half the waits and barriers (the shared memory of 2 stages)
                out += [TileConfig(block_m=bm, block_n=bn, block_k=256, num_warps=warps, num_stages=st, split_k=sk)
                        for st in (2, 3) for sk in sorted({1, split})]
    return out


def _check_config(cfg: TileConfig) -> None:
    if cfg.block_n < 16 * cfg.num_warps or cfg.block_n % (16 * cfg.num_warps) or cfg.block_m > 256 \
            or cfg.num_stages < 2 or cfg.block_k not in (128, 256):
        raise LowbitError("the wgmma kernel needs block_n a multiple of 16 x num_warps, block_m <= 256, "
                          f"num_stages >= 2 and block_k 128 or 256 (tiles per copy group), got {cfg}")


def _launch(x, xs, w: PackedInt4 | FragmentInt4, bias, cfg: TileConfig, out_dtype: torch.dtype, int8: bool,
            sx: torch.Tensor | None = None) -> torch.Tensor:
    _check_config(cfg)
    x = x.contiguous()
    if x.shape[1] % 16 or x.data_ptr() % 16:
        # cp.async moves 4-16 aligned bytes, and the compiler proves a 16-byte chunk all in or all out
        # of the K mask only for a bound that is a multiple of 16: other K (model layers have K a
        # multiple of 64; this is for odd test shapes) are zero-padded once to one
        pad = -x.shape[1] % 16
        x = torch.nn.functional.pad(x, (0, pad)) if pad else x.clone()
    M, N = x.shape[0], w.N
    n_tiles = w.Kp // w.tile_k
    tps = cfg.block_k // 128  # tiles per copy group
    split = max(1, min(cfg.split_k, n_tiles))
    per = cdiv(cdiv(n_tiles, split), tps) * tps  # whole copy groups per split
    split = cdiv(n_tiles, per)  # no empty split
    grid = (cdiv(M, cfg.block_m), cdiv(N, cfg.block_n), split)
    y = torch.empty(M, N, dtype=out_dtype, device=x.device)
    ws, locks = reserve(x.device, M * N, grid[0] * grid[1]) if split > 1 else (y, y)
    triton_launch(
        _mixed_wgmma_kernel, grid,
        x, xs if xs is not None else w.scales, sx if sx is not None else w.scales, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales,
        bias if bias is not None else w.scales, y, ws, locks,
        M, N, x.shape[1], n_tiles, per, w.group_size or w.K, x.stride(0), w.qweight.stride(0), y.stride(0),
        W_FRAG=_frag_layout(int8, cfg.block_n) if isinstance(w, FragmentInt4) else None,
        INT8=int8, HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None, GROUPED=w.group_size is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages, SPLIT_K=split, TPS=tps,
        num_warps=cfg.num_warps,
    )
    return y


def w4a16_mixed_wgmma(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None = None,
                      config: TileConfig | None = None) -> torch.Tensor:
    """x (M, K) fp16 or bf16 @ W^T -> (M, N) in x's dtype; ``w`` a PackedInt4 (128-column tiles) or FragmentInt4.

    ``config``: block_m activation rows per program (the MMA's N side, 16-256), block_n weight rows (a
    multiple of 16 per warp), num_stages shared-memory slots, block_k the K columns of one slot (128: a
    tile; 256: two, so one wait and one barrier per two tiles), split_k programs per output tile."""
    check_activation(x, w.K, (torch.float16, torch.bfloat16), "w4a16 wgmma")
    if not mixed_wgmma_takes(w):
        raise LowbitError("the w4a16 wgmma kernel takes 128-column tiles, no act-order, and groups of a multiple "
                          f"of {_HALF} columns; got tile {w.tile_k}, group {w.group_size}, act-order "
                          f"{w.perm is not None} (use w4a16_matmul)")
    cfg = config or default_wgmma_config(x.shape[0], w.N, w.K, sm_count(x.device, 132))
    return _launch(x, None, w, bias, cfg, x.dtype, int8=False)


def w4a8_mixed_wgmma(xq: torch.Tensor, x_scale: torch.Tensor, w: PackedInt4, out_dtype: torch.dtype,
                     bias: torch.Tensor | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """Per-token int8 activations xq (M, K) with fp32 scales (M,) @ W^T -> (M, N) ``out_dtype``, on int8
    wgmma; ``w`` per channel, from ``pack_for_kernels`` (128-column tiles)."""
    check_activation(xq, w.K, (torch.int8,), "w4a8 wgmma")
    if not mixed_wgmma_takes(w, int8=True):
        raise LowbitError("the w4a8 wgmma kernel takes per-channel weights in 128-column tiles without act-order; "
                          f"got tile {w.tile_k}, group {w.group_size}, act-order {w.perm is not None} "
                          "(use w4a8_matmul)")
    if x_scale.dtype != torch.float32 or x_scale.shape != (xq.shape[0],):
        raise LowbitError(f"x_scale must be ({xq.shape[0]},) fp32, got {tuple(x_scale.shape)} {x_scale.dtype}")
    cfg = config or default_wgmma_config(xq.shape[0], w.N, w.K, sm_count(xq.device, 132))
    return _launch(xq, x_scale, w, bias, cfg, out_dtype, int8=True, sx=xq.sum(1, dtype=torch.int32))

