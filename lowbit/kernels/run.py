"""Running a dispatch choice: each quantized GEMM's kernels (``lowbit.kernels.dispatch`` picks which).

``run_<op>`` takes the layer's tensors in their kernel layout and a ``dispatch.Choice`` and runs the
kernel it names (a Triton kernel with its tile config, or a cuBLAS path at large M). Kernel modules
are imported on first use: they import Triton. Kept apart from ``dispatch`` (which only chooses) so
that kernel modules may ask dispatch for defaults without an import circle.
"""

from __future__ import annotations

import torch

from lowbit.device import sm_count
from lowbit.kernels.dispatch import Choice, default_choice


def run_w4a16(x: torch.Tensor, w, choice: Choice, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16, w ``PackedInt4``, ``FragmentInt4`` or ``CutlassInt4`` -> (M, N) in x's dtype."""
    from lowbit.kernels.cutlass_w4a16 import CutlassInt4, w4a16_cutlass  # (builds nothing until called)
    from lowbit.kernels.layout import FragmentInt4
    from lowbit.kernels.w4a16 import w4a16_matmul

    if isinstance(w, CutlassInt4):
        # a choice for another kernel (a table beyond its tuned range: default_choice) keeps only the
        # CUTLASS kernel's own default tile
        return w4a16_cutlass(x, w, choice.config if choice.kernel == "cutlass" else None, bias)

    if isinstance(w, FragmentInt4) and choice.kernel == "gemv":
        from lowbit.kernels.gemv_frag import frag_gemv_takes, w4a16_frag_gemv

        if frag_gemv_takes(x, w):
            return w4a16_frag_gemv(x, w, bias, choice.config)
        choice = Choice("wgmma")  # more rows than the GEMV takes (a table entry's M range): its default
    if isinstance(w, FragmentInt4) and choice.kernel != "dequant-cublas":
        from lowbit.kernels.mixed_wgmma import w4a16_mixed_wgmma

        # a choice for another kernel (a table beyond its tuned range: default_choice) keeps only
        # the wgmma kernel's own default tile
        return w4a16_mixed_wgmma(x, w, bias, choice.config if choice.kernel == "wgmma" else None)
    if choice.kernel == "dequant-cublas":  # large M: widen once, then cuBLAS fp16/bf16
        from lowbit.kernels.widen import widen_int4

        if w.perm is not None:
            x = x.index_select(1, w.perm)
        y = x @ widen_int4(w, x.dtype).t()
        return y if bias is None else y + bias.to(y.dtype)  # a bias in another dtype must not promote y
    if choice.kernel in ("wgmma", "gemv"):
        # a table in the fragment order, for a layer its kernels do not take in that order (act-order,
        # groups of 32): the Triton kernel, with the heuristic tile (a wgmma tile may not fit it)
        choice = default_choice("w4a16", x.shape[0], w.N, w.K, sm_count(x.device, 132))
    return w4a16_matmul(x, w, bias, choice.config)


def run_w4a8(x: torch.Tensor, w, adtype: str, choice: Choice, smooth: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16 -> per-token 8-bit activations -> int4 weights ``w`` -> (M, N) in x's dtype."""
    from lowbit.kernels.act_quant import quantize_activations

    if w.perm is not None:
        x = x.index_select(1, w.perm)
        smooth = None if smooth is None else smooth[w.perm]
    xq, xs = quantize_activations(x, adtype, smooth)
    return run_w4a8_quantized(xq, xs, _without_perm(w), x.dtype, choice, bias)


def run_w4a8_quantized(xq: torch.Tensor, xs: torch.Tensor, w, out_dtype: torch.dtype, choice: Choice,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Activations already quantized (xq (M, K) int8 / fp8, xs (M,) fp32; columns in ``w``'s order, no
    ``perm``) times int4 weights ``w`` -> (M, N) ``out_dtype``."""
    from lowbit.kernels.cutlass_w4a8 import CutlassInt4PerChannel, w4a8_cutlass
    from lowbit.kernels.w4a8 import w4a8_matmul
    from lowbit.kernels.w4a16 import w4a16_matmul

    if isinstance(w, CutlassInt4PerChannel):
        # a choice for another kernel (beyond the table's tuned range): the CUTLASS kernel's default tile
        return w4a8_cutlass(xq, xs, w, choice.config if choice.kernel == "cutlass" else None, out_dtype, bias)
    if choice.kernel == "gemv":
        from lowbit.kernels.gemv import gemv_takes, w4a8_gemv

        if gemv_takes(xq, w):
            return w4a8_gemv(xq, xs, w, out_dtype, bias, choice.config)
        # a table entry near this shape, for a layer the GEMV cannot take (K % 4, fp8): the heuristic
        M, K = xq.shape
        choice = default_choice("w4a8", M, w.N, K, sm_count(xq.device, 132))
    if choice.kernel == "widen-w8a8":
        # large M, per-channel weights: the int4 codes widened to int8 once, then an int8 GEMM
        from lowbit.kernels.w8a8 import w8a8_cublas, w8a8_matmul
        from lowbit.kernels.widen import widen_int4

        wq = widen_int4(w, torch.int8)
        if choice.config is None and cublas_takes(xq, wq):
            return w8a8_cublas(xq, xs, wq, w.scales[0], out_dtype, bias)
        return w8a8_matmul(xq, xs, wq, w.scales[0], out_dtype, bias, choice.config)
    if choice.kernel == "dequant-cublas":
        # large M, any group: dequantized 8-bit activations times the widened weights on cuBLAS
        from lowbit.kernels.widen import widen_int4

        y = (xq.float() * xs[:, None]).to(out_dtype) @ widen_int4(w, out_dtype).t()
        return y if bias is None else y + bias.to(y.dtype)  # a bias in another dtype must not promote y
    if choice.kernel == "w4a16-fakequant":
        # same int4 weights through the W4A16 kernel: the 8-bit activations, dequantized
        xd = (xq.float() * xs[:, None]).to(out_dtype)
        return w4a16_matmul(xd, w, bias, choice.config)
    return w4a8_matmul(xq, xs, w, out_dtype, bias, choice.config)


def cublas_takes(xq: torch.Tensor, wq: torch.Tensor) -> bool:
    """Shapes cuBLAS's 8-bit GEMMs accept: torch._int_mm needs M > 16 and K, N multiples of 8;
    torch._scaled_mm needs K and N multiples of 16. Others go to the Triton kernel."""
    M, K = xq.shape
    N = wq.shape[0]
    if xq.dtype == torch.int8:
        return M > 16 and K % 8 == 0 and N % 8 == 0
    return K % 16 == 0 and N % 16 == 0


def _without_perm(w):
    if w.perm is None:
        return w
    from dataclasses import replace

    return replace(w, perm=None)


def run_w8a8(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, adtype: str, choice: Choice,
             smooth: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16 -> per-token 8-bit activations @ wq (N, K) 8-bit -> (M, N) in x's dtype."""
    from lowbit.kernels.act_quant import quantize_activations

    xq, xs = quantize_activations(x, adtype, smooth)
    return run_w8a8_quantized(xq, xs, wq, w_scale, x.dtype, choice, bias)


def run_w8a8_quantized(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                       out_dtype: torch.dtype, choice: Choice, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Activations already quantized (xq (M, K), xs (M,) fp32) @ wq (N, K) 8-bit -> (M, N) ``out_dtype``."""
    from lowbit.kernels.w8a8 import w8a8_cublas, w8a8_matmul

    if choice.kernel == "cublas" and cublas_takes(xq, wq):
        return w8a8_cublas(xq, xs, wq, w_scale, out_dtype, bias)
    return w8a8_matmul(xq, xs, wq, w_scale, out_dtype, bias, choice.config)


def run_w4a4(x: torch.Tensor, p, choice: Choice, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16, p ``lowbit.kernels.w4a4.PackedQuik`` -> (M, N) in x's dtype (QUIK: the fused
    outlier split + int4 quantization, then the W4A4 GEMM with the fp16/bf16 outlier columns)."""
    from lowbit.kernels.w4a4 import quik_matmul

    if p.n_out and p.dtype != x.dtype:
        # packed for the model's dtype and called in another: the outlier MMA needs both operands in
        # x's dtype (a per-call cast; QuantLinear packs in the dtype its model runs in)
        from dataclasses import replace

        p = replace(p, outlier_weight=p.outlier_weight.to(x.dtype))
    return quik_matmul(x, p, bias, choice.config)


def run_w4ax(x: torch.Tensor, w, choice: Choice) -> torch.Tensor:
    """x (M, K) fp16/bf16 in the layer's input channel order, w ``lowbit.kernels.w4ax.PackedW4Ax`` (its
    ``bias`` included) -> (M, N) in x's dtype (COMET: mixed 8/4-bit block quantization, then the GEMM).
    ``choice.config`` None: the kernel's ``default_config``."""
    from lowbit.kernels.w4ax import w4ax_matmul
    from lowbit.kernels.w4ax_dequant import w4ax_dequant_matmul

    if choice.kernel == "dequant-cublas":
        return w4ax_dequant_matmul(x, w)
    return w4ax_matmul(x, w, choice.config)


def run_sparse24(x: torch.Tensor, w, choice: Choice, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16, w ``lowbit.kernels.sparse24.PackedSparse24`` -> (M, N) in x's dtype.
    ``choice.config`` None: the kernel's ``default_config``."""
    from lowbit.kernels.sparse24 import sparse24_matmul, widen_sparse24

    if choice.kernel == "dequant-cublas":  # large M: widen once, then cuBLAS fp16/bf16
        y = x @ widen_sparse24(w, x.dtype).t()
        return y if bias is None else y + bias.to(y.dtype)  # a bias in another dtype must not promote y
    return sparse24_matmul(x, w, bias, choice.config)
