"""QUIK's W4A4: per-channel symmetric int4 weights, int4 activations per token, with or without fp16
outlier columns (``lowbit.kernels.w4a4``: the fused split-and-quantize, then the GEMM on INT8 tensor
cores, the 4-bit codes widened in registers: sm_90 has no INT4 MMA)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.errors import LowbitError
from lowbit.kernels import ops
from lowbit.kernels.layout import TILE_K
from lowbit.methods.base import FormatMethod, QuantTensors, have_triton

if TYPE_CHECKING:
    from lowbit.kernels.w4a4 import PackedQuik

_HALF = (torch.float16, torch.bfloat16)


class W4A4(FormatMethod):
    name = table_op = "w4a4"
    needs_triton = True

    def takes(self, layer: QuantTensors) -> bool:
        if layer.afmt.bits != 4 or layer.afmt.fmpq_block is not None or layer.act_perm is not None \
                or not have_triton():
            return False
        from lowbit.kernels import w4a4

        try:
            w4a4.check_format(layer.wfmt, layer.afmt)
        except LowbitError:
            return False
        # per-channel weights carry no g_idx; the gather runs over 1..MAX_K kept columns (pack_quik)
        return layer.g_idx is None and 1 <= layer.quantized_in_features <= w4a4.MAX_K

    def pack(self, layer: QuantTensors, tile_k: int | None = None) -> PackedQuik:
        """The outlier weights stay in the layer's dtype when that is fp16 / bf16 (the dtype the model
        runs in), else fp16; ``run.run_w4a4`` casts them per call if x differs."""
        from lowbit.kernels.w4a4 import pack_quik

        ow = layer.outlier_weight
        dtype = None if ow is None else (ow.dtype if ow.dtype in _HALF else torch.float16)
        return pack_quik(layer.qweight, layer.scales, layer.in_features, layer.outlier_idx, ow, layer.smooth,
                         tile_k=tile_k or TILE_K, dtype=dtype)

    def apply(self, layer: QuantTensors, p: PackedQuik, x: torch.Tensor) -> torch.Tensor:
        return ops.apply_w4a4(x, p, layer.bias)
