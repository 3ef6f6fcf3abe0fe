"""The quantized GEMMs as ``torch.library`` custom ops, so models using them compile and graph-capture.

Each op takes the layer's tensors (kernel layout, ``lowbit.kernels.layout``) and plain Python
numbers, picks its kernel per call through ``lowbit.kernels.dispatch`` (the batch size M is only
known then), and has a fake implementation (shape and dtype only) for ``torch.compile`` tracing. On
a CPU tensor the op runs the PyTorch reference instead: same numerics, no Triton.

- ``lowbit::w4a16``  (x, qweight, scales, zeros?, perm?, bias?, group_size, K, tile_k)
- ``lowbit::w4a8``   (x, qweight, scales, zeros?, perm?, smooth?, bias?, group_size, K, tile_k, act_dtype)
- ``lowbit::w8a8``   (x, wq, w_scale, smooth?, bias?)   activations quantized like ``wq``'s dtype
- ``lowbit::w4a8_quantized`` / ``lowbit::w8a8_quantized``: the same GEMMs on activations a fused kernel
  already quantized (xq int8 / fp8 (..., K), xs (rows,) fp32; ``lowbit.kernels.act_quant``), with the
  output dtype given.

``group_size`` 0 means per channel. ``x`` is (..., K) fp16 or bf16; outputs are (..., N) in x's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels import dispatch
from lowbit.kernels.layout import PackedInt4, unpack_kernel_codes


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
    from lowbit.quant.primitives import quantize_activation

    xf = x.float() if smooth is None else x.float() / smooth
    if act_dtype is None:
        return xf
    q, s = quantize_activation(xf, 8, act_dtype)
    return q.float() * s


def _finish(y: Tensor, bias: Tensor | None, like: Tensor) -> Tensor:
    return (y if bias is None else y + bias.float()).to(like.dtype)


@torch.library.custom_op("lowbit::w4a16", mutates_args=())
def w4a16(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, perm: Tensor | None,
          bias: Tensor | None, group_size: int, K: int, tile_k: int) -> Tensor:
    w = _packed(qweight, scales, zeros, perm, group_size, K, tile_k)
    x2 = x.reshape(-1, K)
    if x.device.type != "cuda":
        xs = x2 if perm is None else x2.index_select(1, perm)
        return _finish(xs.float() @ _dequant_reference(w).t(), bias, x).reshape(*x.shape[:-1], w.N)
    choice = dispatch.choose("w4a16", x2.shape[0], w.N, K, x.device)
    return dispatch.run_w4a16(x2, w, choice, bias).reshape(*x.shape[:-1], w.N)


@w4a16.register_fake
def _(x, qweight, scales, zeros, perm, bias, group_size, K, tile_k):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def w4a8_op_name(group_size: int, act_dtype: str) -> str:
    """The dispatch table's op for a W4A8 layer."""
    if act_dtype == "fp8_e4m3":
        return "w4a8-fp8"
    return "w4a8" if not group_size else "w4a8-g128"


def _w4a8_choice(w: PackedInt4, group_size: int, act_dtype: str, M: int, device: torch.device) -> dispatch.Choice:
    choice = dispatch.choose(w4a8_op_name(group_size, act_dtype), M, w.N, w.K, device)
    if group_size and group_size % w.half:  # groups smaller than a tile half: only the W4A16 kernel
        choice = dispatch.Choice("w4a16-fakequant", choice.config)
    return choice


def _w8a8_op_name(wq: Tensor) -> str:
    return "w8a8-fp8" if wq.dtype == torch.float8_e4m3fn else "w8a8-int8"


@torch.library.custom_op("lowbit::w4a8", mutates_args=())
def w4a8(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, perm: Tensor | None,
         smooth: Tensor | None, bias: Tensor | None, group_size: int, K: int, tile_k: int,
         act_dtype: str) -> Tensor:
    w = _packed(qweight, scales, zeros, perm, group_size, K, tile_k)
    x2 = x.reshape(-1, K)
    if x.device.type != "cuda":
        xa = _reference_act(x2, act_dtype, smooth)
        xa = xa if perm is None else xa.index_select(1, perm)
        return _finish(xa @ _dequant_reference(w).t(), bias, x).reshape(*x.shape[:-1], w.N)
    choice = _w4a8_choice(w, group_size, act_dtype, x2.shape[0], x.device)
    return dispatch.run_w4a8(x2, w, act_dtype, choice, smooth, bias).reshape(*x.shape[:-1], w.N)


@w4a8.register_fake
def _(x, qweight, scales, zeros, perm, smooth, bias, group_size, K, tile_k, act_dtype):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("lowbit::w8a8", mutates_args=())
def w8a8(x: Tensor, wq: Tensor, w_scale: Tensor, smooth: Tensor | None, bias: Tensor | None) -> Tensor:
    act_dtype = "fp8_e4m3" if wq.dtype == torch.float8_e4m3fn else "int"
    N, K = wq.shape
    x2 = x.reshape(-1, K)
    if x.device.type != "cuda":
        xa = _reference_act(x2, act_dtype, smooth)
        return _finish(xa @ (wq.float() * w_scale.float()[:, None]).t(), bias, x).reshape(*x.shape[:-1], N)
    choice = dispatch.choose(_w8a8_op_name(wq), x2.shape[0], N, K, x.device)
    return dispatch.run_w8a8(x2, wq, w_scale, act_dtype, choice, smooth, bias).reshape(*x.shape[:-1], N)


@w8a8.register_fake
def _(x, wq, w_scale, smooth, bias):
    return x.new_empty(*x.shape[:-1], wq.shape[0])


def _dequant_act(xq: Tensor, xs: Tensor) -> Tensor:
    return xq.reshape(-1, xq.shape[-1]).float() * xs[:, None]


@torch.library.custom_op("lowbit::w4a8_quantized", mutates_args=())
def w4a8_quantized(xq: Tensor, xs: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None,
                   bias: Tensor | None, group_size: int, K: int, tile_k: int, act_dtype: str,
                   out_dtype: torch.dtype) -> Tensor:
    w = _packed(qweight, scales, zeros, None, group_size, K, tile_k)
    x2 = xq.reshape(-1, K)
    if xq.device.type != "cuda":
        like = torch.empty(0, dtype=out_dtype)
        return _finish(_dequant_act(x2, xs) @ _dequant_reference(w).t(), bias, like).reshape(*xq.shape[:-1], w.N)
    choice = _w4a8_choice(w, group_size, act_dtype, x2.shape[0], xq.device)
    return dispatch.run_w4a8_quantized(x2, xs, w, out_dtype, choice, bias).reshape(*xq.shape[:-1], w.N)


@w4a8_quantized.register_fake
def _(xq, xs, qweight, scales, zeros, bias, group_size, K, tile_k, act_dtype, out_dtype):
    return xq.new_empty(*xq.shape[:-1], qweight.shape[0], dtype=out_dtype)


@torch.library.custom_op("lowbit::w8a8_quantized", mutates_args=())
def w8a8_quantized(xq: Tensor, xs: Tensor, wq: Tensor, w_scale: Tensor, bias: Tensor | None,
                   out_dtype: torch.dtype) -> Tensor:
    N, K = wq.shape
    x2 = xq.reshape(-1, K)
    if xq.device.type != "cuda":
        like = torch.empty(0, dtype=out_dtype)
        y = _dequant_act(x2, xs) @ (wq.float() * w_scale.float()[:, None]).t()
        return _finish(y, bias, like).reshape(*xq.shape[:-1], N)
    choice = dispatch.choose(_w8a8_op_name(wq), x2.shape[0], N, K, xq.device)
    return dispatch.run_w8a8_quantized(x2, xs, wq, w_scale, out_dtype, choice, bias).reshape(*xq.shape[:-1], N)


@w8a8_quantized.register_fake
def _(xq, xs, wq, w_scale, bias, out_dtype):
    return xq.new_empty(*xq.shape[:-1], wq.shape[0], dtype=out_dtype)
