"""8-bit weights per output channel and 8-bit activations per token of the same dtype: SmoothQuant's
W8A8 int8 and FP8 W8A8 ("Give me BF16 or give me death"): ``lowbit::w8a8``. The codes run as stored;
the kernel layout is only the per-channel scales in fp32."""

from __future__ import annotations

import torch

from lowbit.kernels import ops
from lowbit.kernels.activations import ActQuantSpec, QuantizedActivations
from lowbit.methods.base import FormatMethod, QuantTensors


class W8A8(FormatMethod):
    name = table_op = "w8a8-int8"
    dtype = "int"

    def takes(self, layer: QuantTensors) -> bool:
        w, a = layer.wfmt, layer.afmt
        plain = layer.outlier_idx is None and layer.act_perm is None and layer.fmpq_high is None and a.fmpq_block is None
        return plain and w.bits == 8 and w.group_size is None and w.symmetric and a.bits == 8 \
            and w.dtype == a.dtype == self.dtype

    def pack(self, layer: QuantTensors, tile_k: int | None = None) -> torch.Tensor:
        """(N,) fp32 per-channel scales."""
        return layer.scales[:, 0].float().contiguous()

    def weight_bytes(self, layer: QuantTensors, w_scale: torch.Tensor) -> int:
        return layer.qweight.nbytes + w_scale.nbytes  # the codes run as stored

    def apply(self, layer: QuantTensors, w_scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return ops.run_op(ops.w8a8, x, layer.qweight, w_scale, layer.smooth, layer.bias)

    def input_quant(self, layer: QuantTensors, w_scale: torch.Tensor) -> ActQuantSpec | None:
        return ActQuantSpec(layer.afmt.dtype, layer.smooth)

    def apply_quantized(self, layer: QuantTensors, w_scale: torch.Tensor, x: QuantizedActivations) -> torch.Tensor:
        return ops.run_op(ops.w8a8_quantized, x.q, x.scale, layer.qweight, w_scale, layer.bias, x.dtype)


class W8A8FP8(W8A8):
    name = table_op = "w8a8-fp8"
    dtype = "fp8_e4m3"
    min_capability = (8, 9)
