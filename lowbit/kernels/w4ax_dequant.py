"""COMET W4Ax at large M on cuBLAS: the activations quantized as W4Ax does, stored dequantized.

The W4Ax kernel (``lowbit.kernels.w4ax``) applies a scale per (token, 128-block) to every block's
int32 partial inside its K loop. At small M that is free (the weights' bytes set the time); at
M >= 256 the per-block epilogue outweighs the int8 MMA itself and the kernel fell to 0.23-0.55x of
cuBLAS fp16 on the H100 (docs/kernels.md). Hopper has no INT4 tensor cores, so COMET's 4-bit blocks
buy nothing in compute there either; at large M this path keeps W4Ax's numerics (the same codes and
scales as ``quantize_mixed``) and runs the product on cuBLAS fp16/bf16, as W4A16 does.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.launch import triton_launch
from lowbit.kernels.pdl import launch_options
from lowbit.kernels.w4a16 import check_activation
from lowbit.kernels.w4ax import (
    _ROUND,
    BLOCK,
    HALF,
    PackedW4Ax,
    QuantLaunch,
    _check_mixed_args,
    _quant_kernel,
)

# from this M on, the channel permutation is done as whole-row copies of x^T (below); measured on the
# H100 at K = 14336: 2.8x slower at M = 256 (151 vs 54 us), 1.2x faster at M = 4096 (1175 vs 1398 us)
PERMUTE_ROWS_FROM_M = 2048


def fake_quantize_mixed(x: torch.Tensor, perm: torch.Tensor, n_hi: int, smooth: torch.Tensor | None = None,
                        out_dtype: torch.dtype | None = None, *, permute_rows: bool | None = None) -> torch.Tensor:
    """x (M, K) -> (M, K) ``out_dtype`` (default x's dtype): the mixed 8/4-bit quantization of
    ``quantize_mixed`` (same codes and scales), stored dequantized (code * scale, rounded to
    ``out_dtype``) in the FMPQ column order. For the large-M path (``w4ax_dequant_matmul``).

    ``permute_rows`` (default: from M = ``PERMUTE_ROWS_FROM_M``): gather the permuted channels as rows
    of x^T (transpose, ``index_select`` of whole rows, transpose back: three coalesced copies) and
    quantize those in order, instead of gathering single elements in the kernel. At large M and K the
    per-element gathers miss L1 (each 2-byte read pulls a 32-byte L2 sector; a 28672-channel row is
    56 KB). Measured on the H100 at M = 4096: 3238 -> 2275 us at K = 28672, 1398 -> 1175 us at K =
    14336. Either way this kernel, not the GEMM, sets the path's time at large M: its programs are one
    warp walking a row's blocks in sequence (``quantize_mixed``'s small-M geometry), which leaves it
    latency-bound; a launch that quantizes a row's blocks in parallel is the next lever (docs/kernels.md).
    """
    _check_mixed_args(x, perm, n_hi, smooth)
    out_dtype = out_dtype or x.dtype
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LowbitError(f"fake_quantize_mixed writes fp16, bf16 or fp32, not {out_dtype}")
    M, K = x.shape
    if permute_rows if permute_rows is not None else M >= PERMUTE_ROWS_FROM_M:
        perm = perm.long()
        x = x.t().contiguous().index_select(0, perm).t()
        smooth = None if smooth is None else smooth[perm]
        perm = torch.arange(K, dtype=torch.int32, device=x.device)
    x = x.contiguous()
    out = torch.empty(M, K, dtype=out_dtype, device=x.device)
    if M == 0:
        return out
    launch = QuantLaunch.for_input(x)
    unused = torch.empty(1, dtype=torch.float32, device=x.device)
    triton_launch(_quant_kernel, launch.grid,
        x, perm.contiguous(), smooth if smooth is not None else unused, out, unused, unused, unused,
        M, K, n_hi, -(-K // BLOCK), launch.blocks, x.stride(0), out.stride(0), 0,
        HAS_SMOOTH=smooth is not None, ROWS=launch.rows, HALF_K=HALF, ROUND=_ROUND, FAKE=True,
        num_warps=launch.num_warps, **launch_options(x.device),
    )
    return out


def w4ax_dequant_matmul(x: torch.Tensor, w: PackedW4Ax) -> torch.Tensor:
    """The large-M path (module docstring): x (M, K) fp16/bf16 -> (M, N) in x's dtype.

    The activations are quantized exactly as W4Ax does and stored dequantized (``fake_quantize_mixed``),
    the weights are widened to x's dtype once per call (``lowbit.kernels.widen``), and cuBLAS multiplies
    them. Numerics: ``w4ax_reference``'s, with both operands rounded to x's dtype before an
    fp32-accumulated GEMM.
    """
    from lowbit.kernels.widen import widen_int4

    check_activation(x, w.K, (torch.float16, torch.bfloat16), "w4ax")
    y = fake_quantize_mixed(x, w.perm, w.n_hi, w.smooth) @ widen_int4(w.weight, x.dtype).t()
    return y if w.bias is None else y + w.bias.to(y.dtype)
