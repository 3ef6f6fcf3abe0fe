"""W8A8 GEMM in Triton: int8 x int8 -> int32, or fp8 e4m3 x fp8 e4m3 -> fp32, scales in the epilogue.

y = (xq @ wq^T) * x_scale[m] * w_scale[n] (+ bias). ``xq`` (M, K) comes from
``lowbit.kernels.act_quant.quantize_activations`` (per-token dynamic scales), ``wq`` (N, K) is the
checkpoint's per-channel 8-bit weight as stored (row-major (N, K) is the K-major operand that Hopper's
8-bit MMA wants, so no repack). Dispatch also weighs cuBLAS (``torch._scaled_mm`` for fp8,
``torch._int_mm`` for int8) behind the same activation quantization: whichever is faster per shape.

Numerics: ``lowbit.kernels.reference.w8a8_reference``. int8: exact int32 products and sums, then
fp32 scales. fp8: fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels.config import TileConfig
from lowbit.kernels.launch import cdiv, triton_launch
from lowbit.kernels.pdl import launch_options, wait
from lowbit.kernels.splitk import reserve, store_tile
from lowbit.kernels.w4a16 import check_activation


@triton.jit
def _w8a8_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    SWAP: tl.constexpr, PDL: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm[:, None] < M
    n_ok = rn < N
    ACC_T: tl.constexpr = tl.float32 if FP8 else tl.int32
    wait(PDL)  # PDL (lowbit.kernels.pdl): the kernel before this one has completed
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC_T)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_T)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k_ok = k0 + rk[None, :] < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + rk[None, :], mask=m_ok & k_ok, other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + k0 + rk[None, :], mask=n_ok[:, None] & k_ok, other=0.0)
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc, out_dtype=ACC_T)
        else:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=ACC_T)
    if SWAP:
        acc = tl.trans(acc)
    out_f = acc.to(tl.float32) * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_f = out_f * tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
    store_tile(out_f, rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, stride_ym, HAS_BIAS, SPLIT_K)


def w8a8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """xq (M, K) int8 / float8_e4m3fn, x_scale (M,) fp32, wq (N, K) same dtype, w_scale (N,) -> (M, N) out_dtype."""
    K = wq.shape[1]
    check_activation(xq, K, (torch.int8, torch.float8_e4m3fn), "w8a8")
    if wq.dtype != xq.dtype or wq.ndim != 2:
        raise LowbitError(f"w8a8: weights must be (N, K) {xq.dtype} like the activations, got {wq.dtype}")
    N = wq.shape[0]
    if w_scale.shape != (N,):
        raise LowbitError(f"w8a8: w_scale must be ({N},), got {tuple(w_scale.shape)}")
    if x_scale.shape != (xq.shape[0],) or x_scale.dtype != torch.float32:
        raise LowbitError(f"w8a8: x_scale must be fp32 ({xq.shape[0]},)")
    cfg = config or TileConfig(block_m=64, block_n=128, block_k=128)
    xq, wq = xq.contiguous(), wq.contiguous()
    M = xq.shape[0]
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    pdl = launch_options(xq.device)
    grid = (cdiv(M, cfg.block_m), cdiv(N, cfg.block_n), cfg.split_k)
    ws, locks = reserve(xq.device, M * N if cfg.split_k > 1 else 0, grid[0] * grid[1] if cfg.split_k > 1 else 0)
    triton_launch(_w8a8_kernel, grid,
        xq, x_scale, wq, w_scale, bias if bias is not None else w_scale, y, ws, locks,
        M, N, K, xq.stride(0), wq.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, FP8=xq.dtype == torch.float8_e4m3fn,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, SWAP=cfg.swap,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl,
    )
    return y


def w8a8_cublas(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same product on cuBLAS: ``torch._scaled_mm`` (fp8, row-wise scales) or ``torch._int_mm`` (int8).

    ``torch._int_mm`` needs M > 16 and K, N multiples of 8; its int32 output is scaled in a second
    pass. ``torch._scaled_mm`` with row-wise scales returns bf16, cast to ``out_dtype`` if needed.
    """
    if xq.dtype == torch.float8_e4m3fn:
        y = torch._scaled_mm(xq, wq.t(), scale_a=x_scale[:, None], scale_b=w_scale.float()[None, :],
                             out_dtype=torch.bfloat16, bias=None)
        y = y.to(out_dtype)
    else:
        y = (torch._int_mm(xq, wq.t()).float() * x_scale[:, None] * w_scale.float()[None, :]).to(out_dtype)
    return y if bias is None else y + bias.to(y.dtype)
