"""W4A16 through CUTLASS's Hopper mixed-input GEMM (``cutlass_src/w4a16_sm90.cu``; issue 18, item 1).

Numerics (``reference.w4a16_reference`` defines them): each weight is ``fp16(code) * scale`` rounded
to fp16 (code in [-8, 7], symmetric formats only), the products summed in fp32 by wgmma, the result
rounded to fp16 once. The kernel is the design that gives wgmma its A operand from registers while
TMA and a producer warp keep the shared-memory stages full (docs/kernels.md says why and how fast).

Tensors:
- weights :class:`CutlassInt4`: ``qweight`` (N * K / 2,) uint8 on the GPU, the checkpoint's signed
  codes (``lowbit.numerics.primitives.pack_int4``) reordered by CUTLASS's memory-reordering atom;
  ``scales`` (G, N) fp16, G = K / group (the layout ``PackedInt4.scales`` has).
- ``x`` (M, K) fp16, contiguous; returns ``y`` (M, N) fp16.

Shapes it takes: N and K multiples of 128, group a multiple of 64 dividing K, or per channel; symmetric
codes only, no act-order. (On the H200, 2026-12-03, every configuration gave wrong results at
N = 136, K = 4160 and right ones at every N, K multiple of 128 tested, the Llama layers included: the
weights' reordering tiles whole 128 x 64 blocks. Smaller multiples were not tried.) Anything else raises
:class:`LowbitError` naming the constraint (dispatch then keeps the Triton/Gluon kernels).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.device import sm_count
from lowbit.kernels.cutlass_build import CutlassConfig, Part, reorder_int4, workspace

LIBRARY = "w4a16_sm90"
TILE_K = 64  # K elements per tile for 16-bit MMA operands: 128 bytes, one TMA box row
ALIGN_NK = 128  # N and K the kernels were measured right at (module docstring)


# The compiled set (index = C symbol suffix). Ping-pong needs 64-row tiles; cooperative 128.
CONFIGS: tuple[CutlassConfig, ...] = (
    CutlassConfig(128, 16),
    CutlassConfig(128, 32),
    CutlassConfig(128, 64),
    CutlassConfig(128, 128),
    CutlassConfig(128, 256),
    CutlassConfig(128, 64, stream_k=True),
    CutlassConfig(128, 128, stream_k=True),
    CutlassConfig(64, 64, cooperative=False),
    CutlassConfig(64, 128, cooperative=False),
    CutlassConfig(128, 128, cluster_n=2),
)


def parts() -> list[Part]:
    return [Part(i, c.defines()) for i, c in enumerate(CONFIGS)]


@dataclass
class CutlassInt4:
    """Symmetric int4 weights (N out x K in) in the CUTLASS kernels' order (module docstring)."""

    qweight: torch.Tensor  # (N * K // 2,) uint8, reordered signed codes
    scales: torch.Tensor  # (G, N) fp16
    N: int
    K: int
    group_size: int  # K for per-channel

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 2


def check_shape(N: int, K: int, group_size: int | None) -> None:
    """Raise :class:`LowbitError` unless the CUTLASS kernels take this layer."""
    g = K if group_size is None else group_size
    if K % ALIGN_NK:
        raise LowbitError(f"the CUTLASS W4A16 kernel needs K a multiple of {ALIGN_NK}; this layer has K = {K}")
    if N % ALIGN_NK:
        raise LowbitError(f"the CUTLASS W4A16 kernel needs N a multiple of {ALIGN_NK}; this layer has N = {N}")
    if g % TILE_K or K % g:
        raise LowbitError(f"the CUTLASS W4A16 kernel needs a group size that is a multiple of {TILE_K} and divides "
                          f"K = {K}; this layer has {group_size}")


def _lib() -> ctypes.CDLL:
    from lowbit.kernels.cutlass_build import load

    lib = load(LIBRARY, parts())
    if not getattr(lib, "_lowbit_typed", False):
        lib.lb_w4a16_reorder.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        for i in range(len(CONFIGS)):
            getattr(lib, f"lb_w4a16_workspace_{i}").argtypes = [ctypes.c_int] * 6 + [ctypes.POINTER(ctypes.c_size_t)]
            getattr(lib, f"lb_w4a16_gemm_{i}").argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6 + [ctypes.c_void_p] * 2
        lib._lowbit_typed = True
    return lib


def pack_cutlass(qweight: torch.Tensor, scales: torch.Tensor, K: int, group_size: int | None) -> CutlassInt4:
    """Reorder checkpoint-layout weights for the kernels, on their CUDA device (once, at load).

    ``qweight`` (N, K / 2) uint8 signed codes (``pack_int4``), ``scales`` (N, G) fp16 as checkpoints
    hold them."""
    N = qweight.shape[0]
    check_shape(N, K, group_size)
    G = 1 if group_size is None else K // group_size
    if tuple(scales.shape) != (N, G):
        raise LowbitError(f"scales must be (N, G) = ({N}, {G}), got {tuple(scales.shape)}")
    dst = reorder_int4(lambda *a: _lib().lb_w4a16_reorder(*a), qweight, K, "CUTLASS W4A16")
    return CutlassInt4(dst, scales.t().contiguous().half(), N, K, K if group_size is None else group_size)


def w4a16_cutlass(x: torch.Tensor, w: CutlassInt4, config: int = 2, splits: int = 1) -> torch.Tensor:
    """y (M, N) fp16 = x (M, K) fp16 @ dequant(w)^T on the compiled configuration ``CONFIGS[config]``."""
    if x.dtype != torch.float16:
        raise LowbitError(f"the CUTLASS W4A16 kernel takes fp16 activations, got {x.dtype}")
    if x.shape[-1] != w.K:
        raise LowbitError(f"activations have {x.shape[-1]} features, the layer {w.K}")
    if not 0 <= config < len(CONFIGS):
        raise LowbitError(f"CUTLASS W4A16 config {config} does not exist (0..{len(CONFIGS) - 1})")
    x2 = x.reshape(-1, w.K).contiguous()
    M = x2.shape[0]
    y = torch.empty(M, w.N, dtype=torch.float16, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], w.N)
    lib = _lib()
    sms = sm_count(x.device, 132)
    ws = workspace((LIBRARY, config, M, w.N, w.K, w.group_size, splits, sms),
                   lambda size: getattr(lib, f"lb_w4a16_workspace_{config}")(
                       M, w.N, w.K, w.group_size, splits, sms, ctypes.byref(size)),
                   f"CUTLASS W4A16 config {CONFIGS[config].name()} at M={M} N={w.N} K={w.K} group={w.group_size} "
                   f"splits={splits}", x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    rc = getattr(lib, f"lb_w4a16_gemm_{config}")(x2.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(),
                                                  y.data_ptr(), M, w.N, w.K, w.group_size, splits, sms,
                                                  ws.data_ptr(), stream)
    if rc:
        raise RuntimeError(f"CUTLASS W4A16 {CONFIGS[config].name()} failed (status {rc}) at M={M} N={w.N} K={w.K}")
    return y.reshape(*x.shape[:-1], w.N)
