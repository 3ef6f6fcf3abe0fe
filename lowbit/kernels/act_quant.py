"""Fused activation quantization: optional smoothing, per-token absmax and quantize in one pass.

One program per token (row): the whole row is loaded once into registers (K up to 65536), divided by
the SmoothQuant factors if the layer kept them at run time, reduced to its absmax, quantized and
stored, so the activations are read once and written once (as 8-bit codes) before the 8-bit GEMM.

Numerics (``lowbit.numerics.primitives.quantize_activation``): int8 ``scale = absmax / 127``,
``q = round_half_even(x / scale)`` clamped to [-127, 127]; fp8 e4m3 ``scale = absmax / 448``,
``q = (x / scale)`` rounded to nearest e4m3. Scales are fp32 and at least 1e-12. Divisions are
IEEE (``div_rn``) so that codes match the reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels.launch import next_power_of_2, triton_launch
from lowbit.kernels.pdl import launch_options, start_small

MAX_K = 65536
_ROUND = 12582912.0  # 1.5 * 2**23: (v + R) - R rounds an fp32 |v| < 2**22 to the nearest even integer


@triton.jit
def quantize_row(x, ok, rk, smooth_ptr, q_row_ptr, s_ptr,
                 HAS_SMOOTH: tl.constexpr, FP8: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr):
    """Quantize one token's fp32 values ``x`` (BLOCK,) at columns ``rk`` (valid where ``ok``): store the
    codes at ``q_row_ptr + rk`` and the scale at ``s_ptr`` (module docstring: the numerics)."""
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + rk, mask=ok, other=1.0))
    scale = scale_of(tl.max(tl.abs(x), axis=0), QMAX)
    tl.store(q_row_ptr + rk, codes_of(x, scale, FP8, QMAX, ROUND), mask=ok)
    tl.store(s_ptr, scale)


@triton.jit
def scale_of(absmax, QMAX: tl.constexpr):
    """A token's fp32 scale from the absmax of its (smoothed) values."""
    return tl.maximum(tl.math.div_rn(absmax, QMAX), 1e-12)


@triton.jit
def codes_of(x, scale, FP8: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr):
    """fp32 values -> int8 codes (round half to even, clamped) or fp8 e4m3, at ``scale``."""
    v = tl.math.div_rn(x, scale)
    if FP8:
        q = tl.minimum(tl.maximum(v, -QMAX), QMAX).to(tl.float8e4nv)
    else:
        q = tl.minimum(tl.maximum((v + ROUND) - ROUND, -QMAX), QMAX).to(tl.int8)
    return q


@triton.jit
def _act_quant_kernel(
    x_ptr, smooth_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
    HAS_SMOOTH: tl.constexpr, FP8: tl.constexpr, BLOCK_K: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr,
    PDL: tl.constexpr = False,
):
    start_small(PDL)
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    ok = rk < K
    x = tl.load(x_ptr + row * stride_xm + rk, mask=ok, other=0.0).to(tl.float32)
    quantize_row(x, ok, rk, smooth_ptr, q_ptr + row * stride_qm, s_ptr + row, HAS_SMOOTH, FP8, QMAX, ROUND)


def quant_constants(dtype: str) -> dict:
    """The constexpr arguments of ``quantize_row`` for an activation dtype ("int" or "fp8_e4m3")."""
    if dtype not in ("int", "fp8_e4m3"):
        raise LowbitError(f"activation quantization dtype must be 'int' or 'fp8_e4m3', got {dtype!r}")
    fp8 = dtype == "fp8_e4m3"
    return {"FP8": fp8, "QMAX": 448.0 if fp8 else 127.0, "ROUND": _ROUND}


def empty_codes(rows: int, K: int, dtype: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized (codes (rows, K) int8 / float8_e4m3fn, scales (rows,) fp32) for ``quantize_row``."""
    q = torch.empty(rows, K, dtype=torch.float8_e4m3fn if dtype == "fp8_e4m3" else torch.int8, device=device)
    return q, torch.empty(rows, dtype=torch.float32, device=device)


def check_smooth(smooth: torch.Tensor | None, K: int) -> None:
    if smooth is not None and (smooth.shape != (K,) or smooth.dtype != torch.float32):
        raise LowbitError(f"smooth must be fp32 ({K},), got {smooth.dtype} {tuple(smooth.shape)}")


def quantize_activations(
    x: torch.Tensor, dtype: str = "int", smooth: torch.Tensor | None = None, *, num_warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) fp16/bf16/fp32 -> (codes (M, K) int8 or float8_e4m3fn, scales (M,) fp32).

    ``dtype``: "int" (int8, absmax / 127) or "fp8_e4m3" (absmax / 448). ``smooth`` (K,) fp32:
    the input is divided by it first (SmoothQuant factors kept at run time). ``num_warps`` overrides
    the launch's warp count (``bench/act_quant_sweep.py``); by default it follows the measured rule below.
    """
    if x.ndim != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LowbitError(f"activation quantization takes (M, K) fp16/bf16/fp32, got {x.dtype} {tuple(x.shape)}")
    consts = quant_constants(dtype)
    M, K = x.shape
    if K > MAX_K:
        raise LowbitError(f"activation quantization holds a row in registers: K must be <= {MAX_K}, got {K}")
    check_smooth(smooth, K)
    x = x.contiguous()
    q, s = empty_codes(M, K, dtype, x.device)
    block = next_power_of_2(K)
    triton_launch(_act_quant_kernel, (M,),
        x, smooth if smooth is not None else s, q, s, K, x.stride(0), q.stride(0),
        HAS_SMOOTH=smooth is not None, BLOCK_K=block, **consts,
        # one program per row. Few rows: the row's divisions on one SM are the kernel's latency, so
        # all 32 warps (4+ values per thread); from 512 rows the programs fill the GPU and 16 values
        # per thread win (H200, fp8, bench/act_quant_sweep.py: 4096x4096 14.6 us at 8 warps against
        # 29.1 at 32; 1024x4096 5.1 against 7.7; 128x4096 2.3 at 32 against 2.7 at 8)
        num_warps=num_warps or max(1, min(32, block // (512 if M >= 512 else 128))), **launch_options(x.device),
    )
    return q, s
