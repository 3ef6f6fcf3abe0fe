"""Dense int4 weights in the int4 kernel layout (``lowbit.kernels.layout.PackedInt4``): W4A16 (MARLIN's
format) and W4A8 (OdysseyLLM's FastGEMM: int4 widened to int8 in registers, INT8 tensor cores, or
FP8 activations on FP8 tensor cores).

Any group size, symmetric or not, act-order (``g_idx``: the layout carries the column permutation).
The same int4 codes serve either activation format; 2:4-sparse codes are int4 codes too, so a 2:4
layer with 8-bit activations runs here as a dense W4A8 layer.
"""

from __future__ import annotations

import warnings

import torch

from lowbit.kernels import ops
from lowbit.kernels.activations import ActQuantSpec, QuantizedActivations
from lowbit.kernels.layout import TILE_K, FragmentInt4, PackedInt4, checkpoint_qweight, pack_for_kernels
from lowbit.methods.base import FormatMethod, QuantTensors


def _int4(layer: QuantTensors) -> bool:
    return layer.wfmt.bits == 4 and layer.wfmt.dtype == "int" and layer.outlier_idx is None \
        and layer.act_perm is None and layer.fmpq_high is None and layer.afmt.fmpq_block is None


def _pack(layer: QuantTensors, tile_k: int | None) -> PackedInt4:
    return pack_for_kernels(layer.qweight, layer.scales, layer.zeros, layer.wfmt.group_size,
                            layer.quantized_in_features, layer.g_idx, tile_k=tile_k or TILE_K)


def _pack_cutlass(layer: QuantTensors, act_dtype: str | None = None):  # noqa: ANN202
    """The layer in the CUTLASS kernels' order, or None where they do not take it: W4A16
    (``act_dtype`` None; ``CutlassInt4`` for activations of the layer's ``kernel_dtype``, fp16 or bf16)
    or W4A8 on ``act_dtype`` activations (``CutlassInt4PerChannel``, any output dtype). Both need
    symmetric codes without act-order, and their module's ``takes`` (shapes, groups)."""
    from lowbit.kernels import cutlass_w4a8, cutlass_w4a16
    from lowbit.kernels.cutlass_build import unavailable

    N, K, group = layer.out_features, layer.quantized_in_features, layer.wfmt.group_size
    dtype = getattr(layer, "kernel_dtype", None)
    if act_dtype is None:
        refused = dtype not in cutlass_w4a16.DTYPES.values() or cutlass_w4a16.takes(N, K, group) is not None
    else:
        refused = cutlass_w4a8.takes(N, K, group) is not None
    if refused or layer.zeros is not None:
        return None
    if layer.g_idx is not None and (group is None or not torch.equal(
            layer.g_idx.long(), torch.arange(K, device=layer.g_idx.device) // group)):
        return None  # act-order: the kernels have no column gather
    why = unavailable()
    if why is not None:
        _note_once(f"this GPU's kernel table runs some int4 layers on CUTLASS kernels, which cannot be built "
                   f"here ({why}); those layers run the Gluon/Triton kernels instead")
        return None
    if act_dtype is None:
        return cutlass_w4a16.pack_cutlass(layer.qweight, layer.scales, K, group, dtype)
    return cutlass_w4a8.pack_cutlass_w4a8(layer.qweight, layer.scales, K, act_dtype)


_NOTED: set[str] = set()


def _note_once(msg: str) -> None:
    """A one-line warning per process (packing runs per layer)."""
    if msg not in _NOTED:
        _NOTED.add(msg)
        warnings.warn(msg, stacklevel=3)


class _Int4Dense(FormatMethod):
    """What the dense int4 methods share: the ``PackedInt4`` layout, from which the checkpoint's
    ``qweight`` can be rebuilt exactly (so a model on the GPU keeps one copy of its int4 weights)."""

    def pack(self, layer: QuantTensors, tile_k: int | None = None) -> PackedInt4:
        return _pack(layer, tile_k)

    def checkpoint_qweight(self, layer: QuantTensors, p) -> torch.Tensor:  # noqa: ANN001
        from lowbit.kernels.cutlass_w4a8 import CutlassInt4PerChannel, unpack_cutlass_w4a8
        from lowbit.kernels.cutlass_w4a16 import CutlassInt4, unpack_cutlass

        # the CUTLASS orders: their reordering inverted on the GPU, the same bytes
        if isinstance(p, CutlassInt4):
            return unpack_cutlass(p)
        if isinstance(p, CutlassInt4PerChannel):
            return unpack_cutlass_w4a8(p)
        return checkpoint_qweight(p.to_packed() if isinstance(p, FragmentInt4) else p)


class W4A16(_Int4Dense):
    """int4 weights, fp16/bf16 activations: ``lowbit::w4a16``. Takes no smoothing divisor."""

    name = table_op = "w4a16"

    def takes(self, layer: QuantTensors) -> bool:
        return _int4(layer) and layer.afmt.bits is None and layer.smooth is None

    def pack(self, layer: QuantTensors, tile_k: int | None = None):  # noqa: ANN201
        """The order this GPU's table tuned W4A16 in at the layer's shape, where that order's kernels take
        the layer: CutlassInt4 (the CUTLASS kernels, Hopper: symmetric, no act-order, N and K multiples
        of 128, groups of a multiple of 64, the layer's ``kernel_dtype`` fp16 or bf16), FragmentInt4 (the
        Gluon wgmma kernel, Hopper: no act-order, groups of a multiple of 64), else PackedInt4. A layer
        the CUTLASS kernels refuse takes the fragment order where it can."""
        from lowbit.kernels.dispatch import weight_order

        order = weight_order(layer.qweight.device, self.table_op, layer.out_features, layer.quantized_in_features)
        if order == "cutlass":
            packed = _pack_cutlass(layer)
            if packed is not None:
                return packed
        p = _pack(layer, tile_k)
        if order in ("fragment", "cutlass"):
            from lowbit.kernels.mixed_wgmma import mixed_wgmma_takes  # Gluon: imported on a GPU only

            if mixed_wgmma_takes(p):
                return FragmentInt4.from_packed(p, int8=False)
        return p

    def apply(self, layer: QuantTensors, p, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        from lowbit.kernels.cutlass_w4a16 import CutlassInt4

        if isinstance(p, CutlassInt4):
            return ops.run_op(ops.w4a16_cutlass, x, p.qweight, p.scales, layer.bias, p.group_size, p.K, p.N)
        if isinstance(p, FragmentInt4):
            return ops.run_op(ops.w4a16_frag, x, p.qweight, p.scales, p.zeros, layer.bias, p.group_size or 0, p.K,
                              p.N)
        return ops.run_op(ops.w4a16, x, p.qweight, p.scales, p.zeros, p.perm, layer.bias, p.group_size or 0, p.K,
                          p.tile_k)


class W4A8(_Int4Dense):
    """int4 weights per output channel, int8 activations per token: ``lowbit::w4a8`` (the dispatch
    table picks the GEMV at one row, the INT8 tensor-core kernel, or widening at large M)."""

    name = table_op = "w4a8"
    act_dtype = "int"

    def takes(self, layer: QuantTensors) -> bool:
        a = layer.afmt
        return _int4(layer) and a.bits == 8 and a.dtype == self.act_dtype and self._grouping(layer)

    def _grouping(self, layer: QuantTensors) -> bool:
        return layer.wfmt.group_size is None

    def pack(self, layer: QuantTensors, tile_k: int | None = None):  # noqa: ANN201
        """CutlassInt4PerChannel where this GPU's table packs the layer's shape in CUTLASS's order and
        those kernels take it (per channel, symmetric, N and K multiples of 128), else PackedInt4."""
        from lowbit.kernels.dispatch import weight_order

        if weight_order(layer.qweight.device, self.table_op, layer.out_features,
                        layer.quantized_in_features) == "cutlass":
            packed = _pack_cutlass(layer, layer.afmt.dtype)
            if packed is not None:
                return packed
        return _pack(layer, tile_k)

    def apply(self, layer: QuantTensors, p, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        from lowbit.kernels.cutlass_w4a8 import CutlassInt4PerChannel

        if isinstance(p, CutlassInt4PerChannel):
            return ops.run_op(ops.w4a8_cutlass, x, p.qweight, p.scales, layer.smooth, layer.bias, p.K, p.N,
                              layer.afmt.dtype)
        return ops.run_op(ops.w4a8, x, p.qweight, p.scales, p.zeros, p.perm, layer.smooth, layer.bias,
                          p.group_size or 0, p.K, p.tile_k, layer.afmt.dtype)

    def input_quant(self, layer: QuantTensors, p) -> ActQuantSpec | None:  # noqa: ANN001
        # with act-order the kernel permutes x's columns first: a fused producer cannot quantize for it
        return None if p.perm is not None else ActQuantSpec(layer.afmt.dtype, layer.smooth)

    def apply_quantized(self, layer: QuantTensors, p, x: QuantizedActivations) -> torch.Tensor:  # noqa: ANN001
        from lowbit.kernels.cutlass_w4a8 import CutlassInt4PerChannel

        if isinstance(p, CutlassInt4PerChannel):
            return ops.run_op(ops.w4a8_cutlass_quantized, x.q, x.scale, p.qweight, p.scales, layer.bias, p.K, p.N,
                              layer.afmt.dtype, x.dtype)
        return ops.run_op(ops.w4a8_quantized, x.q, x.scale, p.qweight, p.scales, p.zeros, layer.bias,
                          p.group_size or 0, p.K, p.tile_k, layer.afmt.dtype, x.dtype)


class W4A8Grouped(W4A8):
    """W4A8 with group-wise int4 scales (any group size; the table is tuned at 128)."""

    name = table_op = "w4a8-g128"

    def _grouping(self, layer: QuantTensors) -> bool:
        return layer.wfmt.group_size is not None


class W4A8FP8(W4A8):
    """int4 weights (any grouping), FP8 e4m3 activations per token, on FP8 tensor cores."""

    name = table_op = "w4a8-fp8"
    act_dtype = "fp8_e4m3"
    min_capability = (8, 9)

    def _grouping(self, layer: QuantTensors) -> bool:
        return True
