"""W4A16 on Hopper's wgmma with the int4 conversion overlapped with the tensor cores (Gluon; issue 18).

Why a second W4A16 kernel: compiled for sm_90a, the Triton kernel (``w4a16.py``) issues wgmma at
M >= 64 but ends every K step with ``wgmma.wait_group 0`` (``scripts/kernel_ptx.py``, docs/kernels.md):
its dequantized operand is computed in registers, and Triton's pipeliner only overlaps MMAs whose
operands it copies into shared memory itself. Here the loop is written out (Gluon, Triton's
explicit-layout dialect):

- the weight tile is the MMA's A operand, in registers (wgmma's "RS" form, as Machete and CUTLASS's
  mixed-input GEMMs use): the int4 codes are converted to fp16 straight into the
  ``DotOperandLayout`` the instruction reads, no shared-memory round trip;
- the activation tile is the B operand, staged in shared memory (``NVMMASharedLayout``);
- step t issues its two MMAs (the tile's two 64-column halves, ``kernels/layout.py``) asynchronously,
  then loads step t + 1's packed weights and activations and converts the weights while the tensor
  cores run, and only then waits: the conversion and the global loads overlap the MMA.

The output is computed transposed, Y^T (BLOCK_N x BLOCK_M) = W (BLOCK_N x K) @ X^T, so the weight
rows fill wgmma's 64-row M side and the activation rows are its N side (8-256): M = 32-256 per tile.

Numerics (the reference is ``lowbit.kernels.reference`` / the model's dequantization): each weight is
``(u - zero) * scale`` rounded to fp16 where scales are per group (Marlin and exllama fold group
scales into the fp16 operand the same way), or ``(u - zero)`` exactly with the per-channel scale
applied to the fp32 accumulator; products accumulate in fp32.

Status: compiles for sm_90a (``tests/test_w4a16_wgmma.py`` checks the overlap in its PTX on a CPU);
not yet run on a GPU, so dispatch does not pick it (its GPU test compares it with the reference).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.config import TileConfig
from lowbit.kernels.launch import cdiv, triton_launch
from lowbit.kernels.layout import PackedInt4
from lowbit.kernels.w4a16 import check_activation
from lowbit.requirements import require_triton

require_triton()
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

_HALF = 64  # columns per tile half (layout.TILE_K = 128: low nibbles, then high nibbles)
HALF = gl.constexpr(_HALF)  # the same, for the kernel


@gluon.jit
def _convert(b, z_lo, z_hi, s_lo, s_hi, GROUPED: gl.constexpr):
    """Packed bytes (BLOCK_N, 64) uint8 -> the two halves' fp16 weights, in b's (operand) layout;
    zeros and scales (BLOCK_N,) fp16 in its row slice."""
    # the magic-number conversion (kernels/unpack.py): the fp16 bit pattern 0x6400 | u is 1024 + u, so
    # one OR and one subtraction replace an int -> float conversion (a quarter-rate cvt on the SM)
    lo = ((b & 15).to(gl.uint16) | 0x6400).to(gl.float16, bitcast=True) - (z_lo[:, None] + 1024.0)
    hi = ((b >> 4).to(gl.uint16) | 0x6400).to(gl.float16, bitcast=True) - (z_hi[:, None] + 1024.0)
    if GROUPED:
        lo = lo * s_lo[:, None]
        hi = hi * s_hi[:, None]
    return lo, hi


@gluon.jit
def _w4a16_wgmma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, n_tiles, group_size, stride_xm, stride_wn, stride_ym,
    HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, GROUPED: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, VEC_W: gl.constexpr, num_warps: gl.constexpr,
):
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    # wgmma: 16-row instructions stacked over the warps along the weight rows, N side = BLOCK_M
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    x_ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                          warps_per_cta=[num_warps, 1], order=[1, 0])
    x_sh: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HALF], gl.float16)
    # packed weights load 16 contiguous bytes per thread, then move to the operand layout
    w_ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[8, 4],
                                          warps_per_cta=[num_warps, 1], order=[1, 0])

    # weight rows (operand layout): rows past N repeat the last one and are never stored
    rn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_op))
    rn_ld = gl.minimum(rn, N - 1)
    if VEC_W:  # 16-byte loads, then a layout conversion (through shared memory) to the operand's
        rn_w = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_ld)), N - 1)
        rj = gl.arange(0, HALF, layout=gl.SliceLayout(0, w_ld))
        w_row = w_ptr + rn_w[:, None] * stride_wn + rj[None, :]
    else:  # straight into the operand layout: each thread's bytes come in pairs (2-byte loads)
        rj = gl.arange(0, HALF, layout=gl.SliceLayout(0, a_op))
        w_row = w_ptr + rn_ld[:, None] * stride_wn + rj[None, :]
    # activation rows (load layout): rows past M and columns past K load 0
    rm_x = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_ld))
    rk_x = gl.arange(0, HALF, layout=gl.SliceLayout(0, x_ld))
    x_row = x_ptr + rm_x[:, None] * stride_xm + rk_x[None, :]
    m_ok = rm_x[:, None] < M

    # per-row zero points and group scales, (BLOCK_N,) fp16 in the operand's row slice
    rows: gl.constexpr = gl.SliceLayout(1, a_op)
    z_lo = gl.full([BLOCK_N], 8.0, gl.float16, layout=rows)  # symmetric: the implicit 8
    if HAS_ZEROS and not GROUPED:
        z_lo = gl.load(z_ptr + rn_ld).to(gl.float16)
    z_hi = z_lo
    s_lo = gl.full([BLOCK_N], 1.0, gl.float16, layout=rows)  # per channel: scaled in the epilogue
    s_hi = s_lo
    xs_lo = gl.allocate_shared_memory(gl.float16, [BLOCK_M, HALF], x_sh)
    xs_hi = gl.allocate_shared_memory(gl.float16, [BLOCK_M, HALF], x_sh)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)

    # prologue: tile 0 loaded and converted
    b = gl.convert_layout(gl.load(w_row), a_op)  # a no-op without VEC_W
    x_lo = gl.load(x_row, mask=m_ok & (rk_x[None, :] < K), other=0.0)
    x_hi = gl.load(x_row + HALF, mask=m_ok & (rk_x[None, :] + HALF < K), other=0.0)
    last_group = (K - 1) // group_size  # padding columns past K borrow the last group (their x is 0)
    if GROUPED:
        g_hi = gl.minimum(HALF // group_size, last_group)
        s_lo = gl.load(s_ptr + rn_ld)
        s_hi = gl.load(s_ptr + g_hi * N + rn_ld)
        if HAS_ZEROS:
            z_lo = gl.load(z_ptr + rn_ld).to(gl.float16)
            z_hi = gl.load(z_ptr + g_hi * N + rn_ld).to(gl.float16)
    w_lo, w_hi = _convert(b, z_lo, z_hi, s_lo, s_hi, GROUPED)

    for t in range(n_tiles):
        xs_lo.store(x_lo)
        xs_hi.store(x_hi)
        fence_async_shared()
        acc = warpgroup_mma(w_lo, xs_lo.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(w_hi, xs_hi.permute((1, 0)), acc, is_async=True)
        # step t + 1 (the last step reloads its own tile, unused): loads and conversion overlap the MMAs
        nt = gl.minimum(t + 1, n_tiles - 1)
        k1 = nt * (2 * HALF)
        b = gl.convert_layout(gl.load(w_row + nt * HALF), a_op)
        x_lo = gl.load(x_row + k1, mask=m_ok & (k1 + rk_x[None, :] < K), other=0.0)
        x_hi = gl.load(x_row + k1 + HALF, mask=m_ok & (k1 + HALF + rk_x[None, :] < K), other=0.0)
        if GROUPED:
            g_lo = gl.minimum(k1 // group_size, last_group)
            g_hi = gl.minimum((k1 + HALF) // group_size, last_group)
            s_lo = gl.load(s_ptr + g_lo * N + rn_ld)
            s_hi = gl.load(s_ptr + g_hi * N + rn_ld)
            if HAS_ZEROS:
                z_lo = gl.load(z_ptr + g_lo * N + rn_ld).to(gl.float16)
                z_hi = gl.load(z_ptr + g_hi * N + rn_ld).to(gl.float16)
        n_lo, n_hi = _convert(b, z_lo, z_hi, s_lo, s_hi, GROUPED)
        # the MMAs read w_lo / w_hi from registers and the tiles from shared memory until here; the
        # next tile's operands pass through the wait too, so that they are computed before it
        acc, w_lo, w_hi, n_lo, n_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w_lo, w_hi, n_lo, n_hi))
        w_lo, w_hi = n_lo, n_hi

    # epilogue: acc is Y^T; per-channel scale on the fp32 accumulator, then bias, then y (M, N)
    rn_o = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    rm_o = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    n_ok = rn_o < N
    if not GROUPED:
        acc = acc * gl.load(s_ptr + rn_o, mask=n_ok, other=0.0).to(gl.float32)[:, None]
    if HAS_BIAS:
        acc = acc + gl.load(b_ptr + rn_o, mask=n_ok, other=0.0).to(gl.float32)[:, None]
    y = y_ptr + rm_o[None, :] * stride_ym + rn_o[:, None]
    gl.store(y, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & (rm_o[None, :] < M))


def wgmma_takes(x: torch.Tensor, w: PackedInt4) -> bool:
    """Whether this kernel takes the layer: fp16 activations, no act-order, 128-column packed tiles,
    groups of a multiple of 64 columns (or per channel)."""
    return (x.dtype == torch.float16 and w.perm is None and w.tile_k == 2 * _HALF
            and (w.group_size is None or w.group_size % _HALF == 0))


def w4a16_wgmma_matmul(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None = None,
                       config: TileConfig | None = None, vec_w: bool = True) -> torch.Tensor:
    """x (M, K) fp16 -> (M, N) fp16 through the overlapped wgmma kernel; ``w`` from ``pack_for_kernels``.

    ``config``: block_m activation rows per program (16-256, the MMA's N side), block_n weight rows
    (64 per 4 warps), num_warps. split_k and num_stages are not used (one K loop per tile, one step
    ahead in registers). ``vec_w``: load the packed weights 16 bytes per thread and convert their
    layout through shared memory (True), or load them straight in the MMA operand's layout, 2 bytes
    at a time (False); the two designs are measured side by side (docs/kernels.md)."""
    check_activation(x, w.K, (torch.float16,), "w4a16 wgmma")
    if not wgmma_takes(x, w):
        raise LowbitError("w4a16 wgmma takes fp16 activations, 128-column tiles, no act-order, and groups "
                          f"of a multiple of {_HALF} columns; got {x.dtype}, tile {w.tile_k}, group {w.group_size}, "
                          f"act-order {w.perm is not None} (use w4a16_matmul)")
    cfg = config or TileConfig(block_m=128, block_n=128, num_warps=8)
    if cfg.block_n < 16 * cfg.num_warps or cfg.block_m > 256:
        raise LowbitError(f"w4a16 wgmma needs block_n >= 16 x num_warps and block_m <= 256, got {cfg}")
    x = x.contiguous()
    M, N = x.shape[0], w.N
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grouped = w.group_size is not None
    triton_launch(
        _w4a16_wgmma_kernel, (cdiv(M, cfg.block_m), cdiv(N, cfg.block_n)),
        x, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales,
        bias if bias is not None else w.scales, y,
        M, N, w.K, w.Kp // w.tile_k, w.group_size or w.K, x.stride(0), w.qweight.stride(0), y.stride(0),
        HAS_ZEROS=w.zeros is not None, HAS_BIAS=bias is not None, GROUPED=grouped,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, VEC_W=vec_w, num_warps=cfg.num_warps,
    )
    return y
