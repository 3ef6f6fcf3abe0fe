"""Which GPU op runs a QuantLinear's format, and its weights repacked into that op's kernel layout.

``kernel_op`` decides from the layer's formats and buffers, with the kernels' own format checks
(``lowbit.kernels.w4a4.check_format``; the W4Ax and 2:4 kernels' packing rules); ``pack_kernel_weights``
repacks the checkpoint buffers (``lowbit.model.qlinear``'s module docstring) on whatever device they
are on: ``QuantLinear.prepare_kernels`` runs it on the GPU, the tests on CPU tensors, where the
Triton kernels then run in the interpreter.

  op        formats (weights / activations)                                  kernel layout
  w4a16     int4 (any group, symmetric or not, act-order) / fp16, bf16        PackedInt4
  w4a8      int4 / per-token int8 or fp8                                      PackedInt4
  w8a8      per-channel symmetric int8 or fp8 / per-token, same dtype         codes as stored
  w4a4      QUIK: per-channel symmetric int4 / per-token int4, with or        PackedQuik
            without fp16 outlier columns (lowbit.kernels.w4a4)
  w4ax      COMET: int4 group 128 / FMPQ blocks of 128 at 8 bits (a prefix    PackedW4Ax
            of the blocks) or 4 bits, act_perm order (lowbit.kernels.w4ax)
  sparse24  2:4-sparse symmetric int4 (any group) / fp16, bf16                PackedSparse24
            (lowbit.kernels.sparse24)
Every other layer (group-wise W4A4 without FMPQ, 8-bit weights with 4-bit or FMPQ activations,
outlier columns with 8/16-bit activations, ...) has no kernel and runs QuantLinear.forward's reference.

The W4A4, W4Ax and 2:4 kernel modules import Triton, so they are imported here only when a layer
of their format asks (importing ``lowbit`` stays free of Triton and of GPU queries).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.layout import TILE_K, PackedInt4, pack_for_kernels

if TYPE_CHECKING:
    from lowbit.kernels.sparse24 import PackedSparse24
    from lowbit.kernels.w4a4 import PackedQuik
    from lowbit.kernels.w4ax import PackedW4Ax
    from lowbit.model.qlinear import QuantLinear

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class KernelWeights:
    """What a QuantLinear hands its GPU kernel (``lowbit.kernels.ops``), derived once from its buffers.

    Exactly one of the layout fields is set, the one of ``op``; the layer's bias is not copied here
    (the ops take ``QuantLinear.bias``).
    """

    op: str  # "w4a16", "w4a8", "w8a8", "w4a4", "w4ax" or "sparse24"
    packed: PackedInt4 | None = None  # w4a16 / w4a8: the int4 kernel layout (lowbit.kernels.layout)
    w_scale: torch.Tensor | None = None  # w8a8: (N,) fp32 per-channel scales (codes are qweight as stored)
    quik: PackedQuik | None = None  # w4a4: int4 codes over the kept columns + padded fp16/bf16 outlier columns
    w4ax: PackedW4Ax | None = None  # w4ax: int4 group-128 codes in act_perm order, FMPQ prefix length n_hi
    sparse: PackedSparse24 | None = None  # sparse24: compressed values + pattern nibbles


def _have_triton() -> bool:
    """The W4A4 / W4Ax / 2:4 modules (and their format checks) need Triton; without it no kernel runs."""
    return importlib.util.find_spec("triton") is not None


def _w4a4_takes(m: QuantLinear) -> bool:
    """The QUIK kernel's own format check, plus what its packing needs of the buffers."""
    from lowbit.kernels import w4a4

    try:
        w4a4.check_format(m.wfmt, m.afmt)
    except LowbitError:
        return False
    # per-channel weights carry no g_idx; the gather runs over 1..MAX_K kept columns (pack_quik)
    return m.g_idx is None and 1 <= m.quantized_in_features <= w4a4.MAX_K


def _w4ax_takes(m: QuantLinear) -> bool:
    """What ``pack_w4ax`` accepts: int4 group 128 = FMPQ block 128 (one packed tile per block), int
    activation blocks at 4 or 8 bits, no outlier columns, and the 8-bit blocks a prefix."""
    from lowbit.kernels.w4ax import BLOCK

    w, a = m.wfmt, m.afmt
    if w.bits != 4 or w.dtype != "int" or w.group_size != BLOCK or m.g_idx is not None:
        return False
    if a.bits not in (4, 8) or a.dtype != "int" or a.fmpq_block != BLOCK or m.outlier_idx is not None:
        return False
    high = m.fmpq_high
    if a.bits == 4 and high is not None:
        # assign_fmpq_blocks sorts channels by decreasing absmax, so its 8-bit blocks come first;
        # the kernel's two-phase K loop relies on it (a few-element tensor: one small copy, once)
        n_hi = int(high.sum())
        if not bool(high[:n_hi].all()):
            return False
    return True


def _sparse24_takes(m: QuantLinear) -> bool:
    """What ``pack_sparse24`` accepts: symmetric int4 in natural column order, K a multiple of 4, and
    no smoothing divisor (the kernel multiplies x as it comes)."""
    w = m.wfmt
    return (w.bits == 4 and w.dtype == "int" and w.symmetric and m.g_idx is None and m.smooth is None
            and m.in_features % 4 == 0)


def kernel_op(m: QuantLinear) -> str | None:
    """Which ``lowbit.kernels.ops`` op runs ``m``'s format on the GPU (module docstring), or None."""
    w, a = m.wfmt, m.afmt
    if a.fmpq_block is not None or m.act_perm is not None or m.fmpq_high is not None:  # COMET
        return "w4ax" if _have_triton() and _w4ax_takes(m) else None
    if a.bits == 4:  # QUIK, or plain W4A4
        return "w4a4" if _have_triton() and _w4a4_takes(m) else None
    if m.outlier_idx is not None:  # outlier columns beside 8-bit or fp16 activations: no kernel
        return None
    int4 = w.bits == 4 and w.dtype == "int"
    if int4 and w.sparsity == "2:4" and a.bits is None and _have_triton() and _sparse24_takes(m):
        return "sparse24"
    # 2:4-sparse codes are int4 codes too: with 8-bit activations the dense W4A8 kernel takes them
    if int4 and a.bits == 8:
        return "w4a8"
    if int4 and a.bits is None and m.smooth is None:  # the W4A16 op takes no smoothing divisor
        return "w4a16"
    if w.bits == 8 and w.group_size is None and a.bits == 8 and w.symmetric and w.dtype == a.dtype:
        return "w8a8"
    return None


def table_op(m: QuantLinear, op: str) -> str | None:
    """The dispatch-table op whose tuned layout tile (``dispatch.layout_tile``) ``op``'s weights are
    packed with; None where the layout has no choice (w4ax: 128, one FMPQ block; w8a8: no tiles)."""
    if op == "w4a8":
        from lowbit.kernels.ops import w4a8_op_name

        return w4a8_op_name(m.wfmt.group_size or 0, m.afmt.dtype)
    return op if op in ("w4a16", "w4a4", "sparse24") else None


def pack_kernel_weights(m: QuantLinear, op: str, tile_k: int | None = None) -> KernelWeights:
    """``m``'s weights in ``op``'s kernel layout, on the device its buffers are on.

    ``tile_k``: the packed tile (128 or 256) for the ops that have a choice (``table_op``); None
    gives each layout's default (``lowbit.kernels.layout.TILE_K``, the 2:4 kernel's ``TILE_K``).
    The QUIK outlier weights are kept in the layer's dtype when that is fp16 / bf16 (the dtype the
    model runs in), else cast to fp16; ``dispatch.run_w4a4`` casts them per call if x differs.
    """
    if op == "w8a8":
        return KernelWeights(op, w_scale=m.scales[:, 0].float().contiguous())
    if op in ("w4a16", "w4a8"):
        return KernelWeights(op, packed=pack_for_kernels(
            m.qweight, m.scales, m.zeros, m.wfmt.group_size, m.quantized_in_features, m.g_idx,
            tile_k=tile_k or TILE_K))
    if op == "w4a4":
        from lowbit.kernels.w4a4 import pack_quik

        ow = m.outlier_weight
        dtype = None if ow is None else (ow.dtype if ow.dtype in _HALF else torch.float16)
        return KernelWeights(op, quik=pack_quik(
            m.qweight, m.scales, m.in_features, m.outlier_idx, ow, m.smooth, tile_k=tile_k or TILE_K, dtype=dtype))
    if op == "w4ax":
        from lowbit.kernels.w4ax import pack_w4ax

        # columns already in act_perm order (qweight as stored); smooth in x's own channel order
        return KernelWeights(op, w4ax=pack_w4ax(
            m.qweight, m.scales, m.act_perm, m.fmpq_high, in_features=m.in_features,
            group_size=m.wfmt.group_size, zeros=m.zeros, smooth=m.smooth, act_bits=m.afmt.bits,
            block=m.afmt.fmpq_block))
    if op == "sparse24":
        from lowbit.kernels.sparse24 import TILE_K as SPARSE_TILE_K
        from lowbit.kernels.sparse24 import pack_sparse24

        return KernelWeights(op, sparse=pack_sparse24(
            m.qweight, m.scales, m.in_features, m.wfmt.group_size, tile_k or SPARSE_TILE_K))
    raise LowbitError(f"no kernel layout for op {op!r}; ops: w4a16, w4a8, w8a8, w4a4, w4ax, sparse24")
