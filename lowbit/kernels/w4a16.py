"""W4A16 GEMM in Triton: y = x @ W^T with W stored as int4 codes and fp16 group scales.

First version: a tiled tensor-core kernel over (M, N), looping over K. It reads the checkpoint's
layout directly: ``qweight`` (N, ceil(K/2)) uint8, two codes per byte along K (even column in the
low nibble), ``scales`` (N, G) fp16, optional ``zeros`` (N, G) uint8 for asymmetric formats. The
codes are unpacked and scaled in registers, then fed to ``tl.dot`` in the activation dtype with
fp32 accumulation. One K tile never straddles two groups (BLOCK_K divides the group size), so each
tile needs one scale per output row. A K that is not a multiple of the group (a shorter last group)
and a K that is not a multiple of the tile are handled by masks.

Small M: ``split_k`` > 1 splits the K loop over programs (tile t goes to split t % split_k) and sums
fp32 partials with atomic adds, so a launch with few (M, N) tiles still puts every SM to work.

Not yet here (the kernels issue): a repacked layout for 16-byte loads, stream-K, per-GPU tuned
configs and dispatch, act-order with g_idx.

Numerics: ``lowbit.kernels.reference.w4a16_reference`` (fp32 math). The kernel rounds the
dequantized weight to the activation dtype before the MMA, so it matches to fp16/bf16 precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, group_size,
    stride_xm, stride_qn, stride_sn, stride_ym,
    HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_K // 2)  # packed bytes of one K tile
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # split-K: program pid_k takes every SPLIT_K-th K tile, so small-M launches still fill the SMs
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        bb = k0 // 2 + rb
        packed = tl.load(qw_ptr + rn[:, None] * stride_qn + bb[None, :],
                         mask=(rn[:, None] < N) & (bb[None, :] < (K + 1) // 2), other=0).to(tl.int32)
        lo = packed & 0xF
        hi = (packed >> 4) & 0xF
        codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # (n, byte, nibble) -> (n, k)
        g = k0 // group_size
        scale = tl.load(s_ptr + rn * stride_sn + g, mask=rn < N, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rn * stride_sn + g, mask=rn < N, other=0).to(tl.int32)
            vals = (codes - zero[:, None]).to(tl.float32)
        else:
            vals = ((codes ^ 8) - 8).to(tl.float32)  # 4-bit two's complement -> [-8, 7]
        w = (vals * scale[:, None]).to(x.dtype)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(w))
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # y is an fp32 workspace here, zeroed by the caller; partial sums meet by atomic add
        tl.atomic_add(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=mask)


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int | None,
    K: int,
    *,
    block_m: int = 32,
    block_n: int = 64,
    block_k: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
    split_k: int = 1,
) -> torch.Tensor:
    """x (M, K) fp16 or bf16, contiguous rows -> (M, N) in x's dtype. ``group_size`` None = per channel."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise LowbitError(f"w4a16 takes fp16 or bf16 activations, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != K:
        raise LowbitError(f"w4a16: x must be (M, {K}), got {tuple(x.shape)}")
    N = qweight.shape[0]
    if qweight.dtype != torch.uint8 or qweight.shape[1] != (K + 1) // 2:
        raise LowbitError(f"w4a16: qweight must be uint8 (N, {(K + 1) // 2}), got {qweight.dtype} {tuple(qweight.shape)}")
    group = K if group_size is None else group_size
    G = -(-K // group)
    if scales.shape != (N, G) or scales.dtype != torch.float16:
        raise LowbitError(f"w4a16: scales must be fp16 ({N}, {G}), got {scales.dtype} {tuple(scales.shape)}")
    if zeros is not None and (zeros.shape != (N, G) or zeros.dtype != torch.uint8):
        raise LowbitError(f"w4a16: zeros must be uint8 ({N}, {G})")
    if group_size is not None and group_size % block_k:
        raise LowbitError(f"w4a16: group size {group_size} must be a multiple of the K tile {block_k}")
    x = x.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous()
    if split_k < 1:
        raise LowbitError(f"w4a16: split_k must be >= 1, got {split_k}")
    M = x.shape[0]
    # split-K sums fp32 partials by atomic add (order-dependent in the last bits), then casts once
    y = (torch.zeros(M, N, dtype=torch.float32, device=x.device) if split_k > 1
         else torch.empty(M, N, dtype=x.dtype, device=x.device))
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _w4a16_kernel[grid](
        x, qweight, scales, zeros.contiguous() if zeros is not None else scales, y,
        x.shape[0], N, K, group,
        x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        HAS_ZEROS=zeros is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, num_warps=num_warps, num_stages=num_stages,
    )
    return y if split_k == 1 else y.to(x.dtype)
