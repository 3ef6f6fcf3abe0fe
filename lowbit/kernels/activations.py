"""Activations handed from one kernel to the next, already quantized (no Triton here: the model imports it).

A GEMM with 8-bit per-token activations (W4A8, W8A8) normally starts with its own quantization
kernel (``lowbit.kernels.act_quant``). When the kernel producing its input is a fused one (residual
add + RMSNorm, SiLU-gate: ``lowbit.kernels.fused``), that kernel can quantize its output instead:
one kernel fewer per GEMM, ~2.6 us each at decode on the H100 (bench/profile_decode.py). The GEMM
says how it wants its input (``ActQuantSpec``) and receives ``QuantizedActivations``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActQuantSpec:
    """How a GEMM wants its input quantized, so that the kernel producing that input can do it.

    ``dtype``: "int" (int8) or "fp8_e4m3"; ``smooth``: (K,) fp32 SmoothQuant factors to divide by
    first, or None. Asked of a layer with ``lowbit.model.qlinear.input_quant``.
    """

    dtype: str
    smooth: torch.Tensor | None = None


@dataclass
class QuantizedActivations:
    """Activations already quantized per token, handed from a fused kernel to the GEMM that reads them.

    ``q`` (..., K) int8 or float8_e4m3fn codes; ``scale`` (rows,) fp32, rows = q.numel() // K;
    ``dtype``: the activations' own dtype (fp16 / bf16), which the GEMM's output takes.
    """

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def is_cuda(self) -> bool:
        return self.q.is_cuda
