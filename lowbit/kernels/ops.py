"""The quantized GEMMs as ``torch.library`` custom ops, so models using them compile and graph-capture.

Each op takes the layer's tensors (kernel layout, ``lowbit.kernels.layout``) and plain Python
numbers, picks its kernel per call through ``lowbit.kernels.dispatch`` (the batch size M is only
known then), and has a fake implementation (shape and dtype only) for ``torch.compile`` tracing. On
a CPU tensor the op runs the PyTorch reference instead: same numerics, no Triton.

- ``lowbit::w4a16``  (x, qweight, scales, zeros?, perm?, bias?, group_size, K, tile_k)
- ``lowbit::w4a16_frag`` (x, qweight, scales, zeros?, bias?, group_size, K, N): the same GEMM on the
  tensors of a ``FragmentInt4`` (the weight order of the Gluon wgmma kernel)
- ``lowbit::w4a16_cutlass`` (x, qweight, scales, bias?, group_size, K, N): the same GEMM on the tensors of
  a ``CutlassInt4`` (``lowbit.kernels.cutlass_w4a16``; CUDA only: that order exists only there)
- ``lowbit::w4a8``   (x, qweight, scales, zeros?, perm?, smooth?, bias?, group_size, K, tile_k, act_dtype)
- ``lowbit::w4a8_cutlass`` (x, qweight, scales, smooth?, bias?, K, N, act_dtype) and
  ``lowbit::w4a8_cutlass_quantized`` (xq, xs, qweight, scales, bias?, K, N, act_dtype, out_dtype): W4A8 on
  the tensors of a ``CutlassInt4PerChannel`` (``lowbit.kernels.cutlass_w4a8``; CUDA only)
- ``lowbit::w8a8``   (x, wq, w_scale, smooth?, bias?)   activations quantized like ``wq``'s dtype
- ``lowbit::w4a8_quantized`` / ``lowbit::w8a8_quantized``: the same GEMMs on activations a fused kernel
  already quantized (xq int8 / fp8 (..., K), xs (rows,) fp32; ``lowbit.kernels.act_quant``), with the
  output dtype given.
- ``lowbit::w4a4``   (x, qweight, scales, w_sum, kept_idx, gather_idx, gather_smooth?, outlier_idx,
  outlier_src, outlier_smooth?, outlier_weight?, smooth?, bias?, K, tile_k, out_k): QUIK, the tensors
  of a ``lowbit.kernels.w4a4.PackedQuik`` (int4 activations per token, fp16/bf16 outlier columns)
- ``lowbit::w4ax``   (x, qweight, scales, zeros?, wsum, perm, smooth?, bias?, K, n_hi): COMET, the tensors
  of a ``lowbit.kernels.w4ax.PackedW4Ax`` (blocks of 128 channels, the first ``n_hi`` at 8 bits)
- ``lowbit::sparse24`` (x, data, scales, bias?, group_size, K, tile_k): 2:4-sparse W4A16, the tensors of
  a ``lowbit.kernels.sparse24.PackedSparse24``
  Custom ops take tensors and numbers, not dataclasses: ``apply_w4a4`` / ``apply_w4ax`` /
  ``apply_sparse24`` call them with a packed layer's fields, and each op rebuilds the dataclass.
  Their CPU path is the kernel module's own reference (Triton imported, never run).

``group_size`` 0 means per channel. ``x`` is (..., K) fp16 or bf16; outputs are (..., N) in x's dtype.
``K`` is the layer's in_features (for w4a4 the outlier columns included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.kernels import dispatch, run
from lowbit.kernels.layout import FragmentInt4, PackedInt4, unpack_kernel_codes

if TYPE_CHECKING:
    from lowbit.kernels.sparse24 import PackedSparse24
    from lowbit.kernels.w4a4 import PackedQuik
    from lowbit.kernels.w4ax import PackedW4Ax


# custom op -> its Python body, for eager calls (``run_op``)
EAGER: dict[object, object] = {}


def run_op(op, *args):  # noqa: ANN001, ANN201
    """``op(*args)`` while ``torch.compile`` traces (the traced graph needs the op and its fake), its
    Python body otherwise: eagerly and under CUDA-graph capture the custom-op layer adds only host
    time, 40-85 us per call on the H200 (bench/host_time.py, cProfile of ``backend_impl``)."""
    return op(*args) if torch.compiler.is_compiling() else EAGER[op](*args)


def _packed(qweight, scales, zeros, perm, group_size, K, tile_k) -> PackedInt4:
    return PackedInt4(qweight, scales, zeros, group_size or None, K, perm, tile_k)


def _dequant_reference(w: PackedInt4) -> Tensor:
    """(N, K) fp32 in the packed (post-perm) column order, from the kernel layout."""
    u = unpack_kernel_codes(w).float()
    G = w.scales.shape[0]
    g = torch.zeros(w.K, dtype=torch.long, device=u.device) if w.group_size is None else (
        torch.arange(w.K, device=u.device) // w.group_size).clamp(max=G - 1)
    z = 8.0 if w.zeros is None else w.zeros.t().float()[:, g]
    return (u - z) * w.scales.t().float()[:, g]


def _reference_act(x: Tensor, act_dtype: str | None, smooth: Tensor | None) -> Tensor:
    from lowbit.numerics.primitives import quantize_activation

    xf = x.float() if smooth is None else x.float() / smooth
    if act_dtype is None:
        return xf
    q, s = quantize_activation(xf, 8, act_dtype)
    return q.float() * s


def _finish(y: Tensor, bias: Tensor | None, like: Tensor) -> Tensor:
    return (y if bias is None else y + bias.float()).to(like.dtype)


def _w4a16(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, perm: Tensor | None,
          bias: Tensor | None, group_size: int, K: int, tile_k: int) -> Tensor:
    w = _packed(qweight, scales, zeros, perm, group_size, K, tile_k)
    x2 = x.reshape(-1, K)
    if x.device.type != "cuda":
        xs = x2 if perm is None else x2.index_select(1, perm)
        return _finish(xs.float() @ _dequant_reference(w).t(), bias, x).reshape(*x.shape[:-1], w.N)
    choice = dispatch.choose("w4a16", x2.shape[0], w.N, K, x.device, order="rows")
    return run.run_w4a16(x2, w, choice, bias).reshape(*x.shape[:-1], w.N)


w4a16 = torch.library.custom_op("lowbit::w4a16", _w4a16, mutates_args=())
EAGER[w4a16] = _w4a16


@w4a16.register_fake
def _(x, qweight, scales, zeros, perm, bias, group_size, K, tile_k):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _w4a16_frag(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
                group_size: int, K: int, N: int) -> Tensor:
    w = FragmentInt4(qweight, scales, zeros, group_size or None, K, N, int8=False)
    x2 = x.reshape(-1, K)
    if x.device.type != "cuda":
        return _finish(x2.float() @ _dequant_reference(w.to_packed()).t(), bias, x).reshape(*x.shape[:-1], N)
    choice = dispatch.choose("w4a16", x2.shape[0], N, K, x.device, order="fragment")
    return run.run_w4a16(x2, w, choice, bias).reshape(*x.shape[:-1], N)


w4a16_frag = torch.library.custom_op("lowbit::w4a16_frag", _w4a16_frag, mutates_args=())
EAGER[w4a16_frag] = _w4a16_frag


@w4a16_frag.register_fake
def _(x, qweight, scales, zeros, bias, group_size, K, N):
    return x.new_empty(*x.shape[:-1], N)


def _w4a16_cutlass(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int, K: int,
                   N: int) -> Tensor:
    if x.device.type != "cuda":
        raise LowbitError("CUTLASS-ordered int4 weights exist on CUDA devices only; move the layer to the GPU "
                          "and prepare its kernels there")
    from lowbit.kernels.cutlass_w4a16 import CutlassInt4

    w = CutlassInt4(qweight, scales, N, K, group_size)
    x2 = x.reshape(-1, K)
    choice = dispatch.choose("w4a16", x2.shape[0], N, K, x.device, order="cutlass")
    return run.run_w4a16(x2, w, choice, bias).reshape(*x.shape[:-1], N)


w4a16_cutlass = torch.library.custom_op("lowbit::w4a16_cutlass", _w4a16_cutlass, mutates_args=())
EAGER[w4a16_cutlass] = _w4a16_cutlass


@w4a16_cutlass.register_fake
def _(x, qweight, scales, bias, group_size, K, N):
    return x.new_empty(*x.shape[:-1], N)


def w4a8_op_name(group_size: int, act_dtype: str) -> str:
    """The dispatch table's op for a W4A8 layer."""
    if act_dtype == "fp8_e4m3":
        return "w4a8-fp8"
    return "w4a8" if not group_size else "w4a8-g128"


def _w4a8_choice(w: PackedInt4, group_size: int, act_dtype: str, M: int, device: torch.device) -> dispatch.Choice:
    # the layer's weights are in rows order (PackedInt4): only entries tuned in it apply, whatever order
    # the table packs this shape in (as the W4A16 rows path asks)
    choice = dispatch.choose(w4a8_op_name(group_size, act_dtype), M, w.N, w.K, device, order="rows")
    if group_size and group_size % w.half:  # groups smaller than a tile half: only the W4A16 kernel
        choice = dispatch.Choice("w4a16-fakequant", choice.config)
    return choice


def _w8a8_op_name(wq: Tensor) -> str:
    return "w8a8-fp8" if wq.dtype == torch.float8_e4m3fn else "w8a8-int8"


def _w4a8(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, perm: Tensor | None,
         smooth: Tensor | None, bias: Tensor | None, group_size: int, K: int, tile_k: int,
         act_dtype: str) -> Tensor:
    w = _packed(qweight, scales, zeros, perm, group_size, K, tile_k)
    x2 = x.reshape(-1, K)
    if x.device.type != "cuda":
        xa = _reference_act(x2, act_dtype, smooth)
        xa = xa if perm is None else xa.index_select(1, perm)
        return _finish(xa @ _dequant_reference(w).t(), bias, x).reshape(*x.shape[:-1], w.N)
    choice = _w4a8_choice(w, group_size, act_dtype, x2.shape[0], x.device)
    return run.run_w4a8(x2, w, act_dtype, choice, smooth, bias).reshape(*x.shape[:-1], w.N)


w4a8 = torch.library.custom_op("lowbit::w4a8", _w4a8, mutates_args=())
EAGER[w4a8] = _w4a8


@w4a8.register_fake
def _(x, qweight, scales, zeros, perm, smooth, bias, group_size, K, tile_k, act_dtype):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _w8a8(x: Tensor, wq: Tensor, w_scale: Tensor, smooth: Tensor | None, bias: Tensor | None) -> Tensor:
    act_dtype = "fp8_e4m3" if wq.dtype == torch.float8_e4m3fn else "int"
    N, K = wq.shape
    x2 = x.reshape(-1, K)
    if x.device.type != "cuda":
        xa = _reference_act(x2, act_dtype, smooth)
        return _finish(xa @ (wq.float() * w_scale.float()[:, None]).t(), bias, x).reshape(*x.shape[:-1], N)
    choice = dispatch.choose(_w8a8_op_name(wq), x2.shape[0], N, K, x.device)
    return run.run_w8a8(x2, wq, w_scale, act_dtype, choice, smooth, bias).reshape(*x.shape[:-1], N)


w8a8 = torch.library.custom_op("lowbit::w8a8", _w8a8, mutates_args=())
EAGER[w8a8] = _w8a8


@w8a8.register_fake
def _(x, wq, w_scale, smooth, bias):
    return x.new_empty(*x.shape[:-1], wq.shape[0])


def _dequant_act(xq: Tensor, xs: Tensor) -> Tensor:
    return xq.reshape(-1, xq.shape[-1]).float() * xs[:, None]


def _w4a8_quantized(xq: Tensor, xs: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None,
                   bias: Tensor | None, group_size: int, K: int, tile_k: int, act_dtype: str,
                   out_dtype: torch.dtype) -> Tensor:
    w = _packed(qweight, scales, zeros, None, group_size, K, tile_k)
    x2 = xq.reshape(-1, K)
    if xq.device.type != "cuda":
        like = torch.empty(0, dtype=out_dtype)
        return _finish(_dequant_act(x2, xs) @ _dequant_reference(w).t(), bias, like).reshape(*xq.shape[:-1], w.N)
    choice = _w4a8_choice(w, group_size, act_dtype, x2.shape[0], xq.device)
    return run.run_w4a8_quantized(x2, xs, w, out_dtype, choice, bias).reshape(*xq.shape[:-1], w.N)


w4a8_quantized = torch.library.custom_op("lowbit::w4a8_quantized", _w4a8_quantized, mutates_args=())
EAGER[w4a8_quantized] = _w4a8_quantized


@w4a8_quantized.register_fake
def _(xq, xs, qweight, scales, zeros, bias, group_size, K, tile_k, act_dtype, out_dtype):
    return xq.new_empty(*xq.shape[:-1], qweight.shape[0], dtype=out_dtype)


def _cutlass_w4a8_weights(qweight: Tensor, scales: Tensor, K: int, N: int, act_dtype: str, device: torch.device):  # noqa: ANN202
    if device.type != "cuda":
        raise LowbitError("CUTLASS-ordered int4 weights exist on CUDA devices only; move the layer to the GPU "
                          "and prepare its kernels there")
    from lowbit.kernels.cutlass_w4a8 import CutlassInt4PerChannel

    return CutlassInt4PerChannel(qweight, scales, N, K, act_dtype)


def _w4a8_cutlass(x: Tensor, qweight: Tensor, scales: Tensor, smooth: Tensor | None, bias: Tensor | None, K: int,
                  N: int, act_dtype: str) -> Tensor:
    w = _cutlass_w4a8_weights(qweight, scales, K, N, act_dtype, x.device)
    x2 = x.reshape(-1, K)
    choice = dispatch.choose(w4a8_op_name(0, act_dtype), x2.shape[0], N, K, x.device, order="cutlass")
    return run.run_w4a8(x2, w, act_dtype, choice, smooth, bias).reshape(*x.shape[:-1], N)


w4a8_cutlass = torch.library.custom_op("lowbit::w4a8_cutlass", _w4a8_cutlass, mutates_args=())
EAGER[w4a8_cutlass] = _w4a8_cutlass


@w4a8_cutlass.register_fake
def _(x, qweight, scales, smooth, bias, K, N, act_dtype):
    return x.new_empty(*x.shape[:-1], N)


def _w4a8_cutlass_quantized(xq: Tensor, xs: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, K: int,
                            N: int, act_dtype: str, out_dtype: torch.dtype) -> Tensor:
    w = _cutlass_w4a8_weights(qweight, scales, K, N, act_dtype, xq.device)
    x2 = xq.reshape(-1, K)
    choice = dispatch.choose(w4a8_op_name(0, act_dtype), x2.shape[0], N, K, xq.device, order="cutlass")
    return run.run_w4a8_quantized(x2, xs, w, out_dtype, choice, bias).reshape(*xq.shape[:-1], N)


w4a8_cutlass_quantized = torch.library.custom_op("lowbit::w4a8_cutlass_quantized", _w4a8_cutlass_quantized,
                                                 mutates_args=())
EAGER[w4a8_cutlass_quantized] = _w4a8_cutlass_quantized


@w4a8_cutlass_quantized.register_fake
def _(xq, xs, qweight, scales, bias, K, N, act_dtype, out_dtype):
    return xq.new_empty(*xq.shape[:-1], N, dtype=out_dtype)


def _w8a8_quantized(xq: Tensor, xs: Tensor, wq: Tensor, w_scale: Tensor, bias: Tensor | None,
                   out_dtype: torch.dtype) -> Tensor:
    N, K = wq.shape
    x2 = xq.reshape(-1, K)
    if xq.device.type != "cuda":
        like = torch.empty(0, dtype=out_dtype)
        y = _dequant_act(x2, xs) @ (wq.float() * w_scale.float()[:, None]).t()
        return _finish(y, bias, like).reshape(*xq.shape[:-1], N)
    choice = dispatch.choose(_w8a8_op_name(wq), x2.shape[0], N, K, xq.device)
    return run.run_w8a8_quantized(x2, xs, wq, w_scale, out_dtype, choice, bias).reshape(*xq.shape[:-1], N)


w8a8_quantized = torch.library.custom_op("lowbit::w8a8_quantized", _w8a8_quantized, mutates_args=())
EAGER[w8a8_quantized] = _w8a8_quantized


@w8a8_quantized.register_fake
def _(xq, xs, wq, w_scale, bias, out_dtype):
    return xq.new_empty(*xq.shape[:-1], wq.shape[0], dtype=out_dtype)


# ---- QUIK W4A4, COMET W4Ax, 2:4-sparse W4A16 (kernel modules import Triton: imported on first call) ----

def _quik(qweight, scales, w_sum, kept_idx, gather_idx, gather_smooth, outlier_idx, outlier_src, outlier_smooth,
          outlier_weight, smooth, K, tile_k, out_k) -> PackedQuik:
    from lowbit.kernels.w4a4 import PackedQuik

    weight = PackedInt4(qweight, scales, None, None, kept_idx.numel(), None, tile_k)
    return PackedQuik(weight, w_sum, kept_idx, gather_idx, gather_smooth, outlier_idx, outlier_src, outlier_smooth,
                      outlier_weight, smooth, K, out_k)


def _w4a4(x: Tensor, qweight: Tensor, scales: Tensor, w_sum: Tensor, kept_idx: Tensor, gather_idx: Tensor,
         gather_smooth: Tensor | None, outlier_idx: Tensor, outlier_src: Tensor, outlier_smooth: Tensor | None,
         outlier_weight: Tensor | None, smooth: Tensor | None, bias: Tensor | None, K: int, tile_k: int,
         out_k: int) -> Tensor:
    p = _quik(qweight, scales, w_sum, kept_idx, gather_idx, gather_smooth, outlier_idx, outlier_src, outlier_smooth,
              outlier_weight, smooth, K, tile_k, out_k)
    x2 = x.reshape(-1, K)
    if x.device.type != "cuda":
        from lowbit.kernels.w4a4 import split_quantize_reference, w4a4_reference

        return w4a4_reference(split_quantize_reference(x2, p), p, x.dtype, bias).reshape(*x.shape[:-1], p.N)
    choice = dispatch.choose("w4a4", x2.shape[0], p.N, K, x.device)
    return run.run_w4a4(x2, p, choice, bias).reshape(*x.shape[:-1], p.N)


w4a4 = torch.library.custom_op("lowbit::w4a4", _w4a4, mutates_args=())
EAGER[w4a4] = _w4a4


@w4a4.register_fake
def _(x, qweight, scales, w_sum, kept_idx, gather_idx, gather_smooth, outlier_idx, outlier_src, outlier_smooth,
      outlier_weight, smooth, bias, K, tile_k, out_k):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def apply_w4a4(x: Tensor, p: PackedQuik, bias: Tensor | None = None) -> Tensor:
    """``lowbit::w4a4`` on a layer packed by ``lowbit.kernels.w4a4.pack_quik``: x (..., K) -> (..., N)."""
    w = p.weight
    return run_op(w4a4, x, w.qweight, w.scales, p.w_sum, p.kept_idx, p.gather_idx, p.gather_smooth, p.outlier_idx,
                  p.outlier_src, p.outlier_smooth, p.outlier_weight, p.smooth, bias, p.in_features, w.tile_k, p.out_k)


def _w4ax_layout(qweight, scales, zeros, wsum, perm, smooth, bias, K, n_hi) -> PackedW4Ax:
    from lowbit.kernels.w4ax import BLOCK, PackedW4Ax

    # group = FMPQ block = packed tile = 128: one K-loop step per activation block
    return PackedW4Ax(PackedInt4(qweight, scales, zeros, BLOCK, K, None, BLOCK), wsum, perm, smooth, bias, n_hi)


def _w4ax(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, wsum: Tensor, perm: Tensor,
         smooth: Tensor | None, bias: Tensor | None, K: int, n_hi: int) -> Tensor:
    w = _w4ax_layout(qweight, scales, zeros, wsum, perm, smooth, bias, K, n_hi)
    x2 = x.reshape(-1, K)
    if x.device.type != "cuda":
        from lowbit.kernels.w4ax import quantize_mixed_reference, w4ax_gemm_reference

        acts = quantize_mixed_reference(x2, perm, n_hi, smooth)
        return w4ax_gemm_reference(acts, w, x.dtype).reshape(*x.shape[:-1], w.N)
    choice = dispatch.choose("w4ax", x2.shape[0], w.N, K, x.device)
    return run.run_w4ax(x2, w, choice).reshape(*x.shape[:-1], w.N)


w4ax = torch.library.custom_op("lowbit::w4ax", _w4ax, mutates_args=())
EAGER[w4ax] = _w4ax


@w4ax.register_fake
def _(x, qweight, scales, zeros, wsum, perm, smooth, bias, K, n_hi):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def apply_w4ax(x: Tensor, p: PackedW4Ax, bias: Tensor | None = None) -> Tensor:
    """``lowbit::w4ax`` on a layer packed by ``lowbit.kernels.w4ax.pack_w4ax``: x (..., K) -> (..., N).
    ``bias`` replaces ``p.bias`` (QuantLinear packs without it and passes its own)."""
    w = p.weight
    return run_op(w4ax, x, w.qweight, w.scales, w.zeros, p.wsum, p.perm, p.smooth, bias, p.K, p.n_hi)


def _sparse24(x: Tensor, data: Tensor, scales: Tensor, bias: Tensor | None, group_size: int, K: int,
             tile_k: int) -> Tensor:
    from lowbit.kernels.sparse24 import PackedSparse24, sparse24_reference

    w = PackedSparse24(data, scales, group_size or None, K, tile_k)
    x2 = x.reshape(-1, K)
    if x.device.type != "cuda":
        return sparse24_reference(x2, w, bias).reshape(*x.shape[:-1], w.N)
    choice = dispatch.choose("w4a16-2:4", x2.shape[0], w.N, K, x.device)
    return run.run_sparse24(x2, w, choice, bias).reshape(*x.shape[:-1], w.N)


sparse24 = torch.library.custom_op("lowbit::sparse24", _sparse24, mutates_args=())
EAGER[sparse24] = _sparse24


@sparse24.register_fake
def _(x, data, scales, bias, group_size, K, tile_k):
    return x.new_empty(*x.shape[:-1], data.shape[0])


def apply_sparse24(x: Tensor, p: PackedSparse24, bias: Tensor | None = None) -> Tensor:
    """``lowbit::sparse24`` on a layer packed by ``lowbit.kernels.sparse24.pack_sparse24``: x (..., K) -> (..., N)."""
    return run_op(sparse24, x, p.data, p.scales, bias, p.group_size or 0, p.K, p.tile_k)
