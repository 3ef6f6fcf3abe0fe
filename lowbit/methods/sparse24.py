"""2:4-sparse int4 weights with fp16/bf16 activations (Sparse-Marlin's format): compressed values plus
pattern nibbles, ``lowbit.kernels.sparse24``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.kernels import ops
from lowbit.methods.base import FormatMethod, QuantTensors, have_triton

if TYPE_CHECKING:
    from lowbit.kernels.sparse24 import PackedSparse24


class Sparse24(FormatMethod):
    name = table_op = "w4a16-2:4"
    needs_triton = True

    def takes(self, layer: QuantTensors) -> bool:
        """Symmetric int4 in natural column order, K a multiple of 4, fp16 activations and no smoothing
        divisor (the kernel multiplies x as it comes)."""
        w = layer.wfmt
        return (w.bits == 4 and w.dtype == "int" and w.symmetric and w.sparsity == "2:4" and layer.afmt.bits is None
                and layer.g_idx is None and layer.smooth is None and layer.outlier_idx is None
                and layer.act_perm is None and layer.in_features % 4 == 0 and have_triton())

    def pack(self, layer: QuantTensors, tile_k: int | None = None) -> PackedSparse24:
        from lowbit.kernels.sparse24 import TILE_K, pack_sparse24

        return pack_sparse24(layer.qweight, layer.scales, layer.in_features, layer.wfmt.group_size, tile_k or TILE_K)

    def apply(self, layer: QuantTensors, p: PackedSparse24, x: torch.Tensor) -> torch.Tensor:
        return ops.apply_sparse24(x, p, layer.bias)
