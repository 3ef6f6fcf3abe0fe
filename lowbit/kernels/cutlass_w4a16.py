"""W4A16 through CUTLASS's Hopper mixed-input GEMM (``cutlass_src/w4a16_sm90.cu``; issue 18, item 1).

Numerics (``reference.w4a16_reference`` defines them): each weight is ``code * scale`` rounded to the
activations' type (code in [-8, 7], symmetric formats only; for bf16 the fp16 scales are rounded to
bf16 at load, the mainloop scales in the MMA's type), the products summed in fp32 by wgmma, the
result rounded once to fp16 or bf16. The kernel is the design that gives wgmma its A operand from registers while
TMA and a producer warp keep the shared-memory stages full (docs/kernels.md says why and how fast).

Tensors:
- weights :class:`CutlassInt4`: ``qweight`` (N * K / 2,) uint8 on the GPU, the checkpoint's signed
  codes (``lowbit.numerics.primitives.pack_int4``) reordered by CUTLASS's memory-reordering atom;
  ``scales`` (G, N) fp16 or bf16 (the activations' type), G = K / group (the layout of
  ``PackedInt4.scales``).
- ``x`` (M, K) in that type; returns ``y`` (M, N) in it.

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
from lowbit.kernels.config import CutlassConfig
from lowbit.kernels.cutlass_build import Part, reorder_int4, unreorder_int4, workspace

LIBRARY = "w4a16_sm90"
TILE_K = 64  # K elements per tile for 16-bit MMA operands: 128 bytes, one TMA box row
ALIGN_NK = 128  # N and K the kernels were measured right at (module docstring)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# The compiled tiles. Ping-pong needs 64-row tiles; cooperative 128. Pruned by the H200 sweep of
# 2026-12-03 (docs/results/cutlass-w4a16-h200.json: a plain 32- or 64-token tile and a 64 x 64
# ping-pong one never won a cell), plus split-K tiles for decode batches on narrow layers.
TILES: tuple[CutlassConfig, ...] = (
    CutlassConfig(128, 16),
    CutlassConfig(128, 128),
    CutlassConfig(128, 256),
    CutlassConfig(128, 64, stream_k=True),
    CutlassConfig(128, 128, stream_k=True),
    CutlassConfig(64, 128, cooperative=False),
    CutlassConfig(128, 128, cluster_n=2),
    # decode batches on narrow layers (8B qkv/o/down: 32-48 tiles of 128 rows on 132 SMs): split K
    CutlassConfig(128, 16, stream_k=True),
    CutlassConfig(128, 32, stream_k=True),
)
# bf16: the plain tiles, and 32- and 64-token ones in place of stream-K. On the H200 (2026-12-03) every
# stream-K tile gave inf in bf16 at every M and shape tested (tests/test_cutlass_w4a16.py) while the
# same tiles were right in fp16; the cause (in CUTLASS 4.7's stream-K fix-up with a bf16 mixed-input
# mainloop, or in how it is set up here) is not found, so bf16 compiles none.
BF16_TILES: tuple[CutlassConfig, ...] = tuple(t for t in TILES if not t.stream_k) + (
    CutlassConfig(128, 32), CutlassConfig(128, 64))
TILES_FOR = {"fp16": TILES, "bf16": BF16_TILES}
# (activation dtype, tile): index = C symbol suffix
CONFIGS: tuple[tuple[str, CutlassConfig], ...] = tuple((d, c) for d in DTYPES for c in TILES_FOR[d])


def parts() -> list[Part]:
    return [Part(i, (("LB_BF16", "1" if d == "bf16" else "0"),) + c.defines()) for i, (d, c) in enumerate(CONFIGS)]


def config_index(dtype: torch.dtype, config: CutlassConfig) -> int:
    """The compiled kernel's index for activations of ``dtype`` (fp16 / bf16) and ``config``'s tile."""
    name = next((k for k, v in DTYPES.items() if v == dtype), None)
    if name is None:
        raise LowbitError(f"the CUTLASS W4A16 kernel takes fp16 or bf16 activations, got {dtype}")
    try:
        return CONFIGS.index((name, config.compiled()))
    except ValueError:
        raise LowbitError(f"no CUTLASS W4A16 kernel is compiled for {config.name()} with {name} activations; "
                          f"compiled: {', '.join(c.name() for c in TILES_FOR[name])}") from None


def default_config(M: int, N: int, sms: int = 132, dtype: torch.dtype = torch.float16) -> CutlassConfig:
    """The tile for M tokens where no table names one: the winners of the H200 tuning by M (16-token
    tiles split in two where 128-row tiles cannot fill the SMs, 32- and 64-token stream-K to M = 64,
    128 to 256, then 256). bf16 has no stream-K tiles (``BF16_TILES``): the plain tile of as many tokens."""
    if M <= 16:
        cfg = CutlassConfig(128, 16, stream_k=True, splits=2) if N // 128 < sms else CutlassConfig(128, 16)
    elif M <= 64:
        cfg = CutlassConfig(128, 32 if M <= 32 else 64, stream_k=True)
    else:
        cfg = CutlassConfig(128, 128) if M <= 256 else CutlassConfig(128, 256)
    return for_dtype(cfg, dtype)


def for_dtype(config: CutlassConfig, dtype: torch.dtype) -> CutlassConfig:
    """``config``, or for bf16 activations, where it is a stream-K tile, the plain tile of as many tokens
    (tables are tuned in fp16; bf16 compiles no stream-K tiles: ``BF16_TILES``)."""
    if dtype == torch.bfloat16 and config.stream_k:
        return CutlassConfig(config.tile_n, config.tile_m, config.cluster_n, config.cooperative)
    return config


@dataclass
class CutlassInt4:
    """Symmetric int4 weights (N out x K in) in the CUTLASS kernels' order (module docstring)."""

    qweight: torch.Tensor  # (N * K // 2,) uint8, reordered signed codes
    scales: torch.Tensor  # (G, N) fp16 or bf16: the activations' type
    N: int
    K: int
    group_size: int  # K for per-channel

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 2


def takes(N: int, K: int, group_size: int | None) -> str | None:
    """None when the CUTLASS kernels take this layer, else why not (one line)."""
    g = K if group_size is None else group_size
    if K % ALIGN_NK:
        return f"the CUTLASS W4A16 kernel needs K a multiple of {ALIGN_NK}; this layer has K = {K}"
    if N % ALIGN_NK:
        return f"the CUTLASS W4A16 kernel needs N a multiple of {ALIGN_NK}; this layer has N = {N}"
    if g % TILE_K or K % g:
        return (f"the CUTLASS W4A16 kernel needs a group size that is a multiple of {TILE_K} and divides "
                f"K = {K}; this layer has {group_size}")
    return None


def check_shape(N: int, K: int, group_size: int | None) -> None:
    """Raise :class:`LowbitError` unless the CUTLASS kernels take this layer."""
    why = takes(N, K, group_size)
    if why:
        raise LowbitError(why)


def _lib() -> ctypes.CDLL:
    from lowbit.kernels.cutlass_build import load

    lib = load(LIBRARY, parts())
    if not getattr(lib, "_lowbit_typed", False):
        for fn in (lib.lb_w4a16_reorder, lib.lb_w4a16_unreorder):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        for i in range(len(CONFIGS)):
            getattr(lib, f"lb_w4a16_workspace_{i}").argtypes = [ctypes.c_int] * 6 + [ctypes.POINTER(ctypes.c_size_t)]
            getattr(lib, f"lb_w4a16_gemm_{i}").argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6 + [ctypes.c_void_p] * 2
        lib._lowbit_typed = True
    return lib


def pack_cutlass(qweight: torch.Tensor, scales: torch.Tensor, K: int, group_size: int | None,
                 dtype: torch.dtype = torch.float16) -> CutlassInt4:
    """Reorder checkpoint-layout weights for the kernels of ``dtype`` activations, on their CUDA device
    (once, at load).

    ``qweight`` (N, K / 2) uint8 signed codes (``pack_int4``), ``scales`` (N, G) fp16 as checkpoints
    hold them (kept in ``dtype``, transposed to (G, N))."""
    N = qweight.shape[0]
    check_shape(N, K, group_size)
    if dtype not in DTYPES.values():
        raise LowbitError(f"the CUTLASS W4A16 kernel takes fp16 or bf16 activations, not {dtype}")
    G = 1 if group_size is None else K // group_size
    if tuple(scales.shape) != (N, G):
        raise LowbitError(f"scales must be (N, G) = ({N}, {G}), got {tuple(scales.shape)}")
    dst = reorder_int4(lambda *a: _lib().lb_w4a16_reorder(*a), qweight, K, "CUTLASS W4A16")
    return CutlassInt4(dst, scales.t().to(dtype).contiguous(), N, K, K if group_size is None else group_size)


def unpack_cutlass(w: CutlassInt4) -> torch.Tensor:
    """The checkpoint-layout codes (N, K / 2) uint8 of ``w``: exactly the ``qweight`` it was packed from."""
    return unreorder_int4(lambda *a: _lib().lb_w4a16_unreorder(*a), w.qweight, w.N, w.K, "CUTLASS W4A16")


def w4a16_cutlass(x: torch.Tensor, w: CutlassInt4, config: CutlassConfig | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., N) = x (..., K) @ dequant(w)^T (+ bias) in x's dtype, which must be the one ``w`` was
    packed for, on ``config`` (a compiled tile and its splits; None: ``default_config``)."""
    if x.dtype != w.dtype:
        raise LowbitError(f"these CUTLASS W4A16 weights were packed for {w.dtype} activations, got {x.dtype}")
    if x.shape[-1] != w.K:
        raise LowbitError(f"activations have {x.shape[-1]} features, the layer {w.K}")
    x2 = x.reshape(-1, w.K).contiguous()
    M = x2.shape[0]
    y = torch.empty(M, w.N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], w.N)
    sms = sm_count(x.device, 132)
    config = for_dtype(config, x.dtype) if config else default_config(M, w.N, sms, x.dtype)
    index, splits = config_index(x.dtype, config), config.splits
    lib = _lib()
    ws = workspace((LIBRARY, index, M, w.N, w.K, w.group_size, splits, sms),
                   lambda size: getattr(lib, f"lb_w4a16_workspace_{index}")(
                       M, w.N, w.K, w.group_size, splits, sms, ctypes.byref(size)),
                   f"CUTLASS W4A16 {config.label()} at M={M} N={w.N} K={w.K} group={w.group_size}", x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    rc = getattr(lib, f"lb_w4a16_gemm_{index}")(x2.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(),
                                                 y.data_ptr(), M, w.N, w.K, w.group_size, splits, sms,
                                                 ws.data_ptr(), stream)
    if rc:
        raise RuntimeError(f"CUTLASS W4A16 {config.label()} failed (status {rc}) at M={M} N={w.N} K={w.K}")
    if bias is not None:
        y += bias.to(y.dtype)  # a bias in another dtype must not promote y
    return y.reshape(*x.shape[:-1], w.N)
