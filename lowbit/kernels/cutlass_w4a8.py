"""W4A8 through CUTLASS's Hopper mixed-input GEMM on fp8 or int8 tensor cores (``cutlass_src/w4a8_sm90.cu``).

Numerics (``reference.w4a8_reference`` with per-channel weights defines them): the int4 codes widen
exactly to the activations' 8-bit type, wgmma sums ``xq * code`` (fp32 for e4m3, int32 for int8), and
the epilogue multiplies by ``x_scale[m]`` then ``w_scale[n]`` in fp32 and rounds to fp16 or bf16 once.

Tensors:
- weights :class:`CutlassInt4PerChannel`: ``qweight`` (N * K / 2,) uint8, the checkpoint's signed
  codes (``pack_int4``) reordered for 8-bit MMA operands; ``scales`` (N,) fp32.
- ``xq`` (M, K) ``torch.float8_e4m3fn`` or int8 with ``x_scale`` (M,) fp32 (``quantize_activations``);
  returns ``y`` (M, N) fp16 or bf16 (``out_dtype``; bf16 on the tiles without stream-K only).

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
from lowbit.kernels.cutlass_build import Part, reorder_int4, unreorder_int4, workspace

LIBRARY = "w4a8_sm90"
TILE_K = 128  # 8-bit operands: 128 bytes per K tile row

TILES: tuple[CutlassConfig, ...] = (
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
# (activation dtype, tile) with fp16 output: index = C symbol suffix; then the bf16-output kernels, the
# tiles without stream-K only (CUTLASS W4A16's stream-K tiles gave inf in bf16 on the H200:
# cutlass_w4a16.BF16_TILES)
CONFIGS: tuple[tuple[str, CutlassConfig], ...] = tuple((a, c) for a in ("fp8_e4m3", "int") for c in TILES)
BF16_CONFIGS: tuple[tuple[str, CutlassConfig], ...] = tuple(
    (a, c) for a in ("fp8_e4m3", "int") for c in TILES if not c.stream_k)


def parts() -> list[Part]:
    act = lambda a: ("LB_ACT_FP8", "1" if a == "fp8_e4m3" else "0")  # noqa: E731
    return ([Part(i, (act(a), ("LB_OUT_BF16", "0")) + c.defines()) for i, (a, c) in enumerate(CONFIGS)]
            + [Part(len(CONFIGS) + i, (act(a), ("LB_OUT_BF16", "1")) + c.defines())
               for i, (a, c) in enumerate(BF16_CONFIGS)])


def configs_for(adtype: str) -> list[int]:
    """Indices of the fp16-output configurations compiled for activations of ``adtype`` ("fp8_e4m3" or "int")."""
    return [i for i, (a, _) in enumerate(CONFIGS) if a == adtype]


def tiles_for(out_dtype: torch.dtype) -> tuple[CutlassConfig, ...]:
    """The tiles compiled for this output dtype (bf16: those without stream-K)."""
    return TILES if out_dtype == torch.float16 else tuple(c for c in TILES if not c.stream_k)


def config_index(adtype: str, out_dtype: torch.dtype, config: CutlassConfig) -> int:
    """The compiled kernel's index (C symbol suffix) for these activations, output dtype and tile."""
    table, base = {torch.float16: (CONFIGS, 0), torch.bfloat16: (BF16_CONFIGS, len(CONFIGS))}.get(out_dtype, (None, 0))
    if table is None:
        raise LowbitError(f"the CUTLASS W4A8 kernel writes fp16 or bf16, not {out_dtype}")
    try:
        return base + table.index((adtype, config.compiled()))
    except ValueError:
        raise LowbitError(f"no CUTLASS W4A8 kernel is compiled for {config.name()} with {adtype} activations and "
                          f"{out_dtype} output; compiled: {', '.join(c.name() for c in tiles_for(out_dtype))}") from None


def default_config(M: int, N: int, sms: int = 132, out_dtype: torch.dtype = torch.float16) -> CutlassConfig:
    """The tile for M tokens where no table names one (the H200 sweep's winners by M): 16 tokens, split
    in two where 128-row tiles cannot fill the SMs, 64 to M = 64, 128 to 256, then 256; for bf16 output
    the tile without stream-K of as many tokens (``for_dtype``)."""
    if M <= 16:
        cfg = CutlassConfig(128, 16, stream_k=True, splits=2) if N // 128 < sms else CutlassConfig(128, 16)
    elif M <= 32:
        cfg = CutlassConfig(128, 32)
    elif M <= 64:
        cfg = CutlassConfig(128, 64)
    else:
        cfg = CutlassConfig(128, 128) if M <= 256 else CutlassConfig(128, 256)
    return for_dtype(cfg, out_dtype)


def for_dtype(config: CutlassConfig, out_dtype: torch.dtype) -> CutlassConfig:
    """``config``, or for bf16 output, where it is a stream-K tile, the plain tile of as many tokens."""
    if out_dtype == torch.bfloat16 and config.stream_k:
        return CutlassConfig(config.tile_n, config.tile_m, config.cluster_n, config.cooperative)
    return config


@dataclass
class CutlassInt4PerChannel:
    """Symmetric per-channel int4 weights (N x K) reordered for 8-bit MMA operands (module docstring)."""

    qweight: torch.Tensor  # (N * K // 2,) uint8
    scales: torch.Tensor  # (N,) fp32
    N: int
    K: int
    adtype: str  # the activation type the reorder was made for
    perm: None = None  # no act-order: the dispatch code reads it as PackedInt4's

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4


def takes(N: int, K: int, group_size: int | None) -> str | None:
    """None when the CUTLASS W4A8 kernels take this layer, else why not (one line)."""
    if group_size is not None:
        return f"the CUTLASS W4A8 kernel takes per-channel weights; this layer has groups of {group_size}"
    if K % TILE_K:
        return f"the CUTLASS W4A8 kernel needs K a multiple of {TILE_K}; this layer has K = {K}"
    if N % TILE_K:
        return f"the CUTLASS W4A8 kernel needs N a multiple of {TILE_K}; this layer has N = {N}"
    return None


def check_shape(N: int, K: int) -> None:
    why = takes(N, K, None)
    if why:
        raise LowbitError(why)


def _lib() -> ctypes.CDLL:
    from lowbit.kernels.cutlass_build import load

    lib = load(LIBRARY, parts())
    if not getattr(lib, "_lowbit_typed", False):
        for fn in (lib.lb_w4a8_reorder, lib.lb_w4a8_unreorder):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 2
        for i in range(len(CONFIGS) + len(BF16_CONFIGS)):
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


def unpack_cutlass_w4a8(w: CutlassInt4PerChannel) -> torch.Tensor:
    """The checkpoint-layout codes (N, K / 2) uint8 of ``w``: exactly the ``qweight`` it was packed from."""
    return unreorder_int4(lambda *a: _lib().lb_w4a8_unreorder(*a), w.qweight, w.N, w.K, "CUTLASS W4A8")


def w4a8_cutlass(xq: torch.Tensor, x_scale: torch.Tensor, w: CutlassInt4PerChannel, config: CutlassConfig | None = None,
                 out_dtype: torch.dtype = torch.float16, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., N) ``out_dtype`` (+ bias) from 8-bit activations ``xq`` (..., K) with per-token ``x_scale``
    fp32, on ``config`` (a compiled tile and its splits; None: ``default_config``)."""
    adtype = {torch.float8_e4m3fn: "fp8_e4m3", torch.int8: "int"}.get(xq.dtype)
    if adtype is None or adtype != w.adtype:
        raise LowbitError(f"these weights were reordered for {w.adtype} activations, got {xq.dtype}")
    if xq.shape[-1] != w.K:
        raise LowbitError(f"activations have {xq.shape[-1]} features, the layer {w.K}")
    x2 = xq.reshape(-1, w.K).contiguous()
    M = x2.shape[0]
    if x_scale.numel() != M:
        raise LowbitError(f"x_scale must hold one scale per row ({M}), got {tuple(x_scale.shape)}")
    sx = x_scale.reshape(M).float().contiguous()
    y = torch.empty(M, w.N, dtype=out_dtype, device=xq.device)
    if M == 0:
        return y.reshape(*xq.shape[:-1], w.N)
    sms = sm_count(xq.device, 132)
    config = for_dtype(config, out_dtype) if config else default_config(M, w.N, sms, out_dtype)
    index, splits = config_index(adtype, out_dtype, config), config.splits
    lib = _lib()
    ws = workspace((LIBRARY, index, M, w.N, w.K, splits, sms),
                   lambda size: getattr(lib, f"lb_w4a8_workspace_{index}")(M, w.N, w.K, splits, sms, ctypes.byref(size)),
                   f"CUTLASS W4A8 {config.label()} at M={M} N={w.N} K={w.K}", xq.device)
    rc = getattr(lib, f"lb_w4a8_gemm_{index}")(x2.data_ptr(), sx.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(),
                                                y.data_ptr(), M, w.N, w.K, splits, sms, ws.data_ptr(),
                                                torch.cuda.current_stream(xq.device).cuda_stream)
    if rc:
        raise RuntimeError(f"CUTLASS W4A8 {config.label()} failed (status {rc}) at M={M} N={w.N} K={w.K}")
    if bias is not None:
        y += bias.to(y.dtype)  # a bias in another dtype must not promote y
    return y.reshape(*xq.shape[:-1], w.N)
