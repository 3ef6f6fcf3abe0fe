"""The emulated path: what every kernel must compute, on any device.

Built from ``lowbit.numerics.primitives`` (the bit-exact building blocks, not the algorithms), with the
math in fp32, as ``lowbit.model.qlinear.QuantLinear.forward`` does.
"""

from __future__ import annotations

import torch

from lowbit.formats import WeightFormat
from lowbit.numerics.primitives import dequantize_weight, unpack_int4


def w4a16_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int | None, K: int
) -> torch.Tensor:
    """x (M, K) fp16/bf16 @ W^T, W (N, K) from int4 codes packed (N, ceil(K/2)); returns (M, N) in x's dtype."""
    fmt = WeightFormat(bits=4, symmetric=zeros is None, group_size=group_size, method="rtn")
    codes = unpack_int4(qweight, K, signed=zeros is None)
    w = dequantize_weight(codes, scales, zeros, fmt)
    return (x.float() @ w.t()).to(x.dtype)


def w4a8_reference(
    xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    zeros: torch.Tensor | None, group_size: int | None, K: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Quantized activations xq (M, K) int8 / fp8 with per-token fp32 scales (M,) @ W^T (checkpoint layout)."""
    fmt = WeightFormat(bits=4, symmetric=zeros is None, group_size=group_size, method="rtn")
    w = dequantize_weight(unpack_int4(qweight, K, signed=zeros is None), scales, zeros, fmt)
    return ((xq.float() * x_scale.float()[:, None]) @ w.t()).to(out_dtype)


def w8a8_reference(
    xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """8-bit activations (M, K) with per-token scales (M,) @ 8-bit weights (N, K) with per-channel scales (N,)."""
    return ((xq.float() * x_scale.float()[:, None]) @ (wq.float() * w_scale.float()[:, None]).t()).to(out_dtype)
