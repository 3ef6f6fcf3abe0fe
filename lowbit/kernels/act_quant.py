"""Fused activation quantization: optional smoothing, per-token absmax and quantize in one pass.

One program per token (row): the whole row is loaded once into registers (K up to 65536), divided by
the SmoothQuant factors if the layer kept them at run time, reduced to its absmax, quantized and
stored, so the activations are read once and written once (as 8-bit codes) before the 8-bit GEMM.

Numerics (``lowbit.quant.primitives.quantize_activation``): int8 ``scale = absmax / 127``,
``q = round_half_even(x / scale)`` clamped to [-127, 127]; fp8 e4m3 ``scale = absmax / 448``,
``q = (x / scale)`` rounded to nearest e4m3. Scales are fp32 and at least 1e-12. Divisions are
IEEE (``div_rn``) so that codes match the reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError

MAX_K = 65536
_ROUND = 12582912.0  # 1.5 * 2**23: (v + R) - R rounds an fp32 |v| < 2**22 to the nearest even integer


@triton.jit
def _act_quant_kernel(
    x_ptr, smooth_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
    HAS_SMOOTH: tl.constexpr, FP8: tl.constexpr, BLOCK_K: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr,
):
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    ok = rk < K
    x = tl.load(x_ptr + row * stride_xm + rk, mask=ok, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + rk, mask=ok, other=1.0))
    absmax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(tl.math.div_rn(absmax, QMAX), 1e-12)
    v = tl.math.div_rn(x, scale)
    if FP8:
        q = tl.minimum(tl.maximum(v, -QMAX), QMAX).to(tl.float8e4nv)
    else:
        q = tl.minimum(tl.maximum((v + ROUND) - ROUND, -QMAX), QMAX).to(tl.int8)
    tl.store(q_ptr + row * stride_qm + rk, q, mask=ok)
    tl.store(s_ptr + row, scale)


def quantize_activations(
    x: torch.Tensor, dtype: str = "int", smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) fp16/bf16/fp32 -> (codes (M, K) int8 or float8_e4m3fn, scales (M,) fp32).

    ``dtype``: "int" (int8, absmax / 127) or "fp8_e4m3" (absmax / 448). ``smooth`` (K,) fp32:
    the input is divided by it first (SmoothQuant factors kept at run time).
    """
    if x.ndim != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LowbitError(f"activation quantization takes (M, K) fp16/bf16/fp32, got {x.dtype} {tuple(x.shape)}")
    if dtype not in ("int", "fp8_e4m3"):
        raise LowbitError(f"activation quantization dtype must be 'int' or 'fp8_e4m3', got {dtype!r}")
    M, K = x.shape
    if K > MAX_K:
        raise LowbitError(f"activation quantization holds a row in registers: K must be <= {MAX_K}, got {K}")
    if smooth is not None and (smooth.shape != (K,) or smooth.dtype != torch.float32):
        raise LowbitError(f"smooth must be fp32 ({K},), got {smooth.dtype} {tuple(smooth.shape)}")
    x = x.contiguous()
    fp8 = dtype == "fp8_e4m3"
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(K)
    _act_quant_kernel[(M,)](
        x, smooth if smooth is not None else s, q, s, K, x.stride(0), q.stride(0),
        HAS_SMOOTH=smooth is not None, FP8=fp8, BLOCK_K=block, QMAX=448.0 if fp8 else 127.0, ROUND=_ROUND,
        num_warps=max(1, min(16, block // 1024)),
    )
    return q, s
