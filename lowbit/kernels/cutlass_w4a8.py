"""W4A8 through CUTLASS's Hopper mixed-input GEMM on fp8 or int8 tensor cores (``cutlass_src/w4a8_sm90.cu``).

Numerics (``reference.w4a8_reference`` with per-channel weights defines them): the int4 codes widen
exactly to the activations' 8-bit type, wgmma sums ``xq * code`` (fp32 for e4m3, int32 for int8), and
the epilogue multiplies by ``x_scale[m]`` then ``w_scale[n]`` in fp32 and rounds to fp16 once.

Tensors:
- weights :class:`CutlassInt4PerChannel`: ``qweight`` (N * K / 2,) uint8, the checkpoint's signed
  codes (``pack_int4``) reordered for 8-bit MMA operands; ``scales`` (N,) fp32.
- ``xq`` (M, K) ``torch.float8_e4m3fn`` or int8 with ``x_scale`` (M,) fp32 (``quantize_activations``);
  returns ``y`` (M, N) fp16.

Shapes it takes: N and K multiples of 128, per-channel symmetric weights. (On the H200, 2026-12-03,
every configuration but the 16-token tile gave wrong results at N = 136, and all were right at
N = 256 and on the Llama layers; smaller multiples of N were not tried.)
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.device import sm_count
from lowbit.kernels.config import CutlassConfig
from lowbit.kernels.cutlass_build import Part, reorder_int4, workspace

LIBRARY = "w4a8_sm90"
TILE_K = 128  # 8-bit operands: 128 bytes per K tile row

_TILES: tuple[CutlassConfig, ...] = (
    CutlassConfig(128, 16),
    CutlassConfig(128, 64),
    CutlassConfig(128, 128),
    CutlassConfig(128, 256),
    CutlassConfig(128, 128, stream_k=True),
    CutlassConfig(64, 128, cooperative=False),
    # decode batches: 32-token tiles, and split K on the narrow layers
    CutlassConfig(128, 32),
    CutlassConfig(128, 16, stream_k=True),
    CutlassConfig(128, 32, stream_k=True),
)
# (activation dtype, tile): index = C symbol suffix
CONFIGS: tuple[tuple[str, CutlassConfig], ...] = tuple((a, c) for a in ("fp8_e4m3", "int") for c in _TILES)


def parts() -> list[Part]:
    return [Part(i, (("LB_ACT_FP8", "1" if a == "fp8_e4m3" else "0"),) + c.defines())
            for i, (a, c) in enumerate(CONFIGS)]


def configs_for(adtype: str) -> list[int]:
    """Indices of the configurations compiled for activations of ``adtype`` ("fp8_e4m3" or "int")."""
    return [i for i, (a, _) in enumerate(CONFIGS) if a == adtype]


@dataclass
class CutlassInt4PerChannel:
    """Symmetric per-channel int4 weights (N x K) reordered for 8-bit MMA operands (module docstring)."""

    qweight: torch.Tensor  # (N * K // 2,) uint8
    scales: torch.Tensor  # (N,) fp32
    N: int
    K: int
    adtype: str  # the activation type the reorder was made for

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4


def check_shape(N: int, K: int) -> None:
    if K % TILE_K:
        raise LowbitError(f"the CUTLASS W4A8 kernel needs K a multiple of {TILE_K}; this layer has K = {K}")
    if N % TILE_K:
        raise LowbitError(f"the CUTLASS W4A8 kernel needs N a multiple of {TILE_K}; this layer has N = {N}")


def _lib() -> ctypes.CDLL:
    from lowbit.kernels.cutlass_build import load

    lib = load(LIBRARY, parts())
    if not getattr(lib, "_lowbit_typed", False):
        lib.lb_w4a8_reorder.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 2
        for i in range(len(CONFIGS)):
            getattr(lib, f"lb_w4a8_workspace_{i}").argtypes = [ctypes.c_int] * 5 + [ctypes.POINTER(ctypes.c_size_t)]
            getattr(lib, f"lb_w4a8_gemm_{i}").argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 2
        lib._lowbit_typed = True
    return lib


def pack_cutlass_w4a8(qweight: torch.Tensor, scales: torch.Tensor, K: int, adtype: str) -> CutlassInt4PerChannel:
    """Reorder checkpoint-layout weights, ``qweight`` (N, K / 2) uint8 signed codes and per-channel
    ``scales`` (N,) or (N, 1), for the kernels on their CUDA device (once, at load)."""
    N = qweight.shape[0]
    check_shape(N, K)
    if adtype not in ("fp8_e4m3", "int"):
        raise LowbitError(f"the CUTLASS W4A8 kernel takes fp8_e4m3 or int activations, not {adtype!r}")
    if scales.numel() != N:
        raise LowbitError(f"the CUTLASS W4A8 kernel takes one scale per output channel ({N}), got {tuple(scales.shape)}")
    dst = reorder_int4(lambda *a: _lib().lb_w4a8_reorder(*a), qweight, K, "CUTLASS W4A8")
    return CutlassInt4PerChannel(dst, scales.reshape(N).float().contiguous(), N, K, adtype)


def w4a8_cutlass(xq: torch.Tensor, x_scale: torch.Tensor, w: CutlassInt4PerChannel, config: int | None = None,
                 splits: int = 1) -> torch.Tensor:
    """y (M, N) fp16 from 8-bit activations ``xq`` (M, K) with per-token ``x_scale`` (M,) fp32 on
    ``CONFIGS[config]`` (default: the 128 x 128 tile for the weights' activation type)."""
    adtype = {torch.float8_e4m3fn: "fp8_e4m3", torch.int8: "int"}.get(xq.dtype)
    if adtype is None or adtype != w.adtype:
        raise LowbitError(f"these weights were reordered for {w.adtype} activations, got {xq.dtype}")
    if config is None:
        config = configs_for(adtype)[2]
    if not 0 <= config < len(CONFIGS) or CONFIGS[config][0] != adtype:
        raise LowbitError(f"CUTLASS W4A8 config {config} is not one for {adtype} activations: {configs_for(adtype)}")
    if xq.shape[-1] != w.K:
        raise LowbitError(f"activations have {xq.shape[-1]} features, the layer {w.K}")
    x2 = xq.reshape(-1, w.K).contiguous()
    M = x2.shape[0]
    if x_scale.numel() != M:
        raise LowbitError(f"x_scale must hold one scale per row ({M}), got {tuple(x_scale.shape)}")
    sx = x_scale.reshape(M).float().contiguous()
    y = torch.empty(M, w.N, dtype=torch.float16, device=xq.device)
    if M == 0:
        return y.reshape(*xq.shape[:-1], w.N)
    lib = _lib()
    sms = sm_count(xq.device, 132)
    ws = workspace((LIBRARY, config, M, w.N, w.K, splits, sms),
                   lambda size: getattr(lib, f"lb_w4a8_workspace_{config}")(M, w.N, w.K, splits, sms, ctypes.byref(size)),
                   f"CUTLASS W4A8 config {CONFIGS[config][1].name()} at M={M} N={w.N} K={w.K} splits={splits}",
                   xq.device)
    rc = getattr(lib, f"lb_w4a8_gemm_{config}")(x2.data_ptr(), sx.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(),
                                                 y.data_ptr(), M, w.N, w.K, splits, sms, ws.data_ptr(),
                                                 torch.cuda.current_stream(xq.device).cuda_stream)
    if rc:
        raise RuntimeError(f"CUTLASS W4A8 {CONFIGS[config][1].name()} failed (status {rc}) at M={M} N={w.N} K={w.K}")
    return y.reshape(*xq.shape[:-1], w.N)
