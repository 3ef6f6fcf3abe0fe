"""QuantizedWeight: what a quantization algorithm (RTN, GPTQ, SparseGPT) produces for one Linear.

``lowbit.model.qlinear.QuantLinear`` turns it into packed buffers for inference; the checkpoint
stores those buffers. Columns are the Linear's input channels *after* the caller removed outlier
columns and applied any channel permutation, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import WeightFormat
from lowbit.numerics.primitives import dequantize_weight


@dataclass
class QuantizedWeight:
    fmt: WeightFormat
    codes: torch.Tensor  # (N, K) int8 (symmetric int), uint8 (asymmetric int) or float8_e4m3fn
    scale: torch.Tensor  # (N, G) fp16
    zero: torch.Tensor | None = None  # (N, G) uint8, asymmetric only
    g_idx: torch.Tensor | None = None  # (K,) int64 group of each column; None = natural order (i // group)

    def dequantize(self) -> torch.Tensor:
        """fp32 (N, K)."""
        return dequantize_weight(self.codes, self.scale, self.zero, self.fmt, self.g_idx)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]
