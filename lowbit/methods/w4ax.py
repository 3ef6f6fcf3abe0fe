"""COMET's W4Ax: int4 weights in groups of 128, activations in FMPQ blocks of 128 channels at 8 or 4
bits (the 8-bit blocks first, in ``act_perm`` order), ``lowbit.kernels.w4ax``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.kernels import ops
from lowbit.methods.base import FormatMethod, QuantTensors, have_triton

if TYPE_CHECKING:
    from lowbit.kernels.w4ax import PackedW4Ax


class W4Ax(FormatMethod):
    name = "w4ax"
    table_op = None  # the layout has no choice: one packed tile per 128-channel block
    needs_triton = True

    def takes(self, layer: QuantTensors) -> bool:
        """What ``pack_w4ax`` accepts: int4 group 128 = FMPQ block 128 (one packed tile per block), int
        activation blocks at 4 or 8 bits, no outlier columns, and the 8-bit blocks a prefix."""
        w, a = layer.wfmt, layer.afmt
        if a.fmpq_block is None and layer.act_perm is None and layer.fmpq_high is None:
            return False
        if not have_triton():
            return False
        from lowbit.kernels.w4ax import BLOCK

        if w.bits != 4 or w.dtype != "int" or w.group_size != BLOCK or layer.g_idx is not None:
            return False
        if a.bits not in (4, 8) or a.dtype != "int" or a.fmpq_block != BLOCK or layer.outlier_idx is not None:
            return False
        high = layer.fmpq_high
        if a.bits == 4 and high is not None:
            # assign_fmpq_blocks sorts channels by decreasing absmax, so its 8-bit blocks come first;
            # the kernel's two-phase K loop relies on it (a few-element tensor: one small copy, once)
            n_hi = int(high.sum())
            if not bool(high[:n_hi].all()):
                return False
        return True

    def pack(self, layer: QuantTensors, tile_k: int | None = None) -> PackedW4Ax:
        from lowbit.kernels.w4ax import pack_w4ax

        # columns already in act_perm order (qweight as stored); smooth in x's own channel order
        return pack_w4ax(layer.qweight, layer.scales, layer.act_perm, layer.fmpq_high, in_features=layer.in_features,
                         group_size=layer.wfmt.group_size, zeros=layer.zeros, smooth=layer.smooth,
                         act_bits=layer.afmt.bits, block=layer.afmt.fmpq_block)

    def apply(self, layer: QuantTensors, p: PackedW4Ax, x: torch.Tensor) -> torch.Tensor:
        return ops.apply_w4ax(x, p, layer.bias)
