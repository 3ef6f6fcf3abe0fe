"""QuantLinear: a Linear layer whose weight is stored quantized, with the reference (emulated) forward.

This is where ``lowbit.quant`` (the algorithms) and, later, ``lowbit.kernels`` meet. The forward
here defines the numerics every kernel must reproduce: it dequantizes the weight, quantizes the
activations exactly as the scheme says, and multiplies in fp32, on any device.

Buffers (all persistent, saved in the checkpoint under ``<layer>.<buffer>``):
  qweight        (N, ceil(Kq/2)) uint8, int4 codes packed two per byte (see primitives.pack_int4)
                 or (N, Kq) int8 / uint8 / float8_e4m3fn for 8-bit formats
  scales         (N, G) fp16
  zeros          (N, G) uint8, asymmetric formats only
  g_idx          (Kq,) int32, act-order without static groups only
  bias           (N,) model dtype, if the layer has one
  smooth         (K,) fp32, SmoothQuant factors that could not be folded: the input is divided by them
  outlier_idx    (n_out,) int64, QUIK input columns kept in high precision, ascending
  outlier_weight (N, n_out) model dtype, their weights
  act_perm       (Kq,) int64, COMET channel order of the quantized columns (weights stored in it)
  fmpq_high      (ceil(Kq / block),) bool, COMET blocks quantized at 8 bits
Kq = K - n_out is the number of quantized input columns, taken in ascending order of the
columns that are not outliers, then permuted by ``act_perm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, WeightFormat
from lowbit.kernels.activations import ActQuantSpec, QuantizedActivations
from lowbit.kernels.layout import PackedInt4
from lowbit.quant.primitives import (
    dequantize_weight,
    fake_quantize_activation,
    pack_int4,
    unpack_int4,
)
from lowbit.quant.quantized import QuantizedWeight

_OPTIONAL = ("zeros", "g_idx", "bias", "smooth", "outlier_idx", "outlier_weight", "act_perm", "fmpq_high")


@dataclass
class KernelWeights:
    """What a QuantLinear hands its GPU kernel (``lowbit.kernels.ops``), derived once from its buffers."""

    op: str  # "w4a16", "w4a8" or "w8a8"
    packed: PackedInt4 | None = None  # int4 formats: the kernel layout (lowbit.kernels.layout)
    w_scale: torch.Tensor | None = None  # w8a8: (N,) fp32 per-channel scales (codes are qweight as stored)


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, wfmt: WeightFormat, afmt: ActivationFormat) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.wfmt, self.afmt = wfmt, afmt
        for name in ("qweight", "scales", *_OPTIONAL):
            self.register_buffer(name, None)
        # Opt-in (cache_dequantized_weights): keep the fp32 dequantized weight between calls. Same
        # numbers, no per-call dequantization; costs 4 bytes per weight, so off by default.
        self.cache_weights = False
        self._weight_cache: torch.Tensor | None = None
        # set by prepare_kernels() when a GPU kernel takes this format
        self._kernel: KernelWeights | None = None

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        afmt: ActivationFormat,
        *,
        in_features: int,
        dtype: torch.dtype,
        bias: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
        outlier_idx: torch.Tensor | None = None,
        outlier_weight: torch.Tensor | None = None,
        act_perm: torch.Tensor | None = None,
        fmpq_high: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Pack an algorithm's result; ``dtype`` is the model's activation dtype (bias, outlier weights)."""
        N, Kq = qw.shape
        n_out = 0 if outlier_idx is None else len(outlier_idx)
        if Kq + n_out != in_features:
            raise LowbitError(f"quantized columns ({Kq}) + outliers ({n_out}) != in_features ({in_features})")
        m = cls(in_features, N, qw.fmt, afmt)
        packed = qw.fmt.bits == 4 and qw.fmt.dtype == "int"
        # detached: an autograd graph behind the scales would keep the float weights alive
        m.qweight = pack_int4(qw.codes.detach()) if packed else qw.codes.detach().clone()
        m.scales = qw.scale.detach().to(torch.float16)
        m.zeros = None if qw.zero is None else qw.zero.detach()
        m.g_idx = None if qw.g_idx is None else qw.g_idx.to(torch.int32)
        m.bias = None if bias is None else bias.detach().to(dtype)
        m.smooth = None if smooth is None else smooth.detach().float()
        if n_out:
            m.outlier_idx = outlier_idx.long()
            m.outlier_weight = outlier_weight.detach().to(dtype)
        m.act_perm = None if act_perm is None else act_perm.long()
        m.fmpq_high = None if fmpq_high is None else fmpq_high.bool()
        return m

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], in_features: int, wfmt: WeightFormat, afmt: ActivationFormat
    ) -> QuantLinear:
        """Rebuild from checkpoint tensors named without the layer prefix (``qweight``, ``scales``, ...)."""
        missing = [k for k in ("qweight", "scales") if k not in tensors]
        if missing:
            raise LowbitError(f"quantized layer lacks {', '.join(missing)}; the checkpoint is incomplete")
        m = cls(in_features, tensors["scales"].shape[0], wfmt, afmt)
        for name, t in tensors.items():
            if name not in ("qweight", "scales", *_OPTIONAL):
                raise LowbitError(f"unknown quantized-layer tensor {name!r}; was this written by a newer lowbit?")
            setattr(m, name, t)
        return m

    @classmethod
    def concat(cls, mods: list[QuantLinear]) -> QuantLinear | None:
        """One layer whose output is the concatenation of ``mods``' outputs (same input), or None when
        they differ in format, smoothing factors or act-order, or hold outlier columns / FMPQ blocks."""
        first = mods[0]
        same = all(m.wfmt == first.wfmt and m.afmt == first.afmt and m.in_features == first.in_features
                   for m in mods)
        special = any(m.outlier_idx is not None or m.act_perm is not None or m.fmpq_high is not None for m in mods)
        if not same or special:
            return None
        for name in ("smooth", "g_idx"):
            ts = [getattr(m, name) for m in mods]
            if any(t is None for t in ts) != all(t is None for t in ts):
                return None
            if ts[0] is not None and not all(torch.equal(t, ts[0]) for t in ts):
                return None
        if any(m.bias is None for m in mods) != all(m.bias is None for m in mods):
            return None
        out = cls(first.in_features, sum(m.out_features for m in mods), first.wfmt, first.afmt)
        for name in ("qweight", "scales", "zeros", "bias"):  # all indexed by output channel first
            ts = [getattr(m, name) for m in mods]
            setattr(out, name, None if ts[0] is None else torch.cat(ts))
        out.smooth, out.g_idx = first.smooth, first.g_idx
        return out

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must move these buffers but never re-round them: scales stay fp16, codes
        # integer, smoothing factors fp32. Only bias and outlier weights follow the model's dtype.
        dtypes = {k: b.dtype for k, b in self._buffers.items() if b is not None}
        self._weight_cache = None
        self._kernel = None  # kernel tensors are derived on one device: prepare_kernels() again after a move
        super()._apply(fn, recurse)
        for k, dt in dtypes.items():
            b = self._buffers[k]
            if k not in ("bias", "outlier_weight") and b is not None and b.dtype != dt:
                self._buffers[k] = b.to(dt)
        return self

    @property
    def quantized_in_features(self) -> int:
        return self.in_features - (0 if self.outlier_idx is None else self.outlier_idx.numel())

    def codes(self) -> torch.Tensor:
        """(N, Kq) unpacked codes."""
        if self.wfmt.bits == 4 and self.wfmt.dtype == "int":
            return unpack_int4(self.qweight, self.quantized_in_features, signed=self.wfmt.symmetric)
        return self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        """(N, Kq) fp32, columns in stored (kept, then act_perm) order."""
        g_idx = None if self.g_idx is None else self.g_idx.long()
        return dequantize_weight(self.codes(), self.scales, self.zeros, self.wfmt, g_idx)

    def kept_idx(self) -> torch.Tensor | None:
        """Ascending indices of the non-outlier input columns, or None when there are no outliers."""
        if self.outlier_idx is None:
            return None
        keep = torch.ones(self.in_features, dtype=torch.bool, device=self.outlier_idx.device)
        keep[self.outlier_idx] = False
        return keep.nonzero().squeeze(1)

    def kernel_op(self) -> str | None:
        """Which ``lowbit.kernels.ops`` op runs this layer's format on the GPU, or None (reference only).

        Formats with outlier columns (QUIK), FMPQ blocks (COMET), 4-bit activations or 2:4 sparsity
        have no kernel yet and stay on the reference path.
        """
        w, a = self.wfmt, self.afmt
        if self.outlier_idx is not None or self.act_perm is not None or w.sparsity or a.fmpq_block:
            return None
        if w.bits == 4 and w.dtype == "int" and a.bits in (None, 8):
            return "w4a16" if a.bits is None else "w4a8"
        if w.bits == 8 and w.group_size is None and a.bits == 8 and w.symmetric and w.dtype == a.dtype:
            return "w8a8"
        return None

    def prepare_kernels(self) -> bool:
        """Repack the weights into the kernel layout on their current device; False if no kernel applies."""
        from lowbit.kernels.layout import pack_for_kernels

        op = self.kernel_op()
        if op is None or self.qweight.device.type != "cuda":
            self._kernel = None
            return False
        if op == "w8a8":
            self._kernel = KernelWeights(op, w_scale=self.scales[:, 0].float().contiguous())
            return True
        from lowbit.kernels.dispatch import layout_tile
        from lowbit.kernels.ops import w4a8_op_name

        table_op = op if op == "w4a16" else w4a8_op_name(self.wfmt.group_size or 0, self.afmt.dtype)
        self._kernel = KernelWeights(op, packed=pack_for_kernels(
            self.qweight, self.scales, self.zeros, self.wfmt.group_size, self.quantized_in_features, self.g_idx,
            tile_k=layout_tile(self.qweight.device, table_op)))
        return True

    def input_quant(self) -> ActQuantSpec | None:
        """How this layer's GPU kernel quantizes its input, when a fused kernel before it may do that
        instead (``lowbit.kernels.fused``): 8-bit per-token formats on kernels, without act-order."""
        k = self._kernel
        if k is None or k.op not in ("w4a8", "w8a8") or (k.packed is not None and k.packed.perm is not None):
            return None
        return ActQuantSpec(self.afmt.dtype, self.smooth)

    def _quantized_forward(self, x: QuantizedActivations) -> torch.Tensor:
        from lowbit.kernels import ops

        k, p = self._kernel, self._kernel.packed
        if k is None or k.op not in ("w4a8", "w8a8"):
            raise LowbitError("pre-quantized activations reached a layer without an 8-bit-activation kernel")
        if k.op == "w4a8":
            return ops.w4a8_quantized(x.q, x.scale, p.qweight, p.scales, p.zeros, self.bias, p.group_size or 0,
                                      p.K, p.tile_k, self.afmt.dtype, x.dtype)
        return ops.w8a8_quantized(x.q, x.scale, self.qweight, k.w_scale, self.bias, x.dtype)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from lowbit.kernels import ops

        k, p = self._kernel, self._kernel.packed
        if k.op == "w4a16":
            return ops.w4a16(x, p.qweight, p.scales, p.zeros, p.perm, self.bias, p.group_size or 0, p.K, p.tile_k)
        if k.op == "w4a8":
            return ops.w4a8(x, p.qweight, p.scales, p.zeros, p.perm, self.smooth, self.bias, p.group_size or 0,
                            p.K, p.tile_k, self.afmt.dtype)
        return ops.w8a8(x, self.qweight, k.w_scale, self.smooth, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype.

        With kernels prepared and x fp16/bf16 on the GPU: the dispatched kernel. Otherwise the
        reference, with the math in fp32 (the numerical spec every kernel is tested against).
        ``x`` may also be ``QuantizedActivations`` made by a fused kernel as ``input_quant`` asked.
        """
        if isinstance(x, QuantizedActivations):
            return self._quantized_forward(x)
        if self._kernel is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            return self._kernel_forward(x)
        xf = x.float()
        if self.smooth is not None:
            xf = xf / self.smooth
        y = None
        if self.outlier_idx is not None:
            y = xf[..., self.outlier_idx] @ self.outlier_weight.float().t()
            xf = xf[..., self.kept_idx()]
        if self.act_perm is not None:
            xf = xf[..., self.act_perm]
        xq = fake_quantize_activation(xf, self.afmt, self.fmpq_high)
        if self.cache_weights:
            if self._weight_cache is None:
                self._weight_cache = self.dequantized_weight()
            w = self._weight_cache
        else:
            w = self.dequantized_weight()
        out = xq @ w.t()
        if y is not None:
            out = out + y
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        w = f"w{self.wfmt.bits}{'' if self.wfmt.dtype == 'int' else '-fp8'}"
        g = f"g{self.wfmt.group_size}" if self.wfmt.group_size else "per-channel"
        a = f"a{self.afmt.bits}" if self.afmt.bits else "a16"
        n_out = 0 if self.outlier_idx is None else self.outlier_idx.numel()
        return f"{self.in_features}->{self.out_features}, {w} {g} {a}" + (f", {n_out} outliers" if n_out else "")


def input_quant(module: nn.Module | None) -> ActQuantSpec | None:
    """``module.input_quant()`` for a QuantLinear, None for anything else (fp16 Linear, None)."""
    return module.input_quant() if isinstance(module, QuantLinear) else None


def use_kernels(model: nn.Module, enabled: bool = True) -> tuple[int, int]:
    """Run every QuantLinear whose format has a GPU kernel through it (after the model is on the GPU).

    Returns (layers on kernels, quantized layers). Layers without a kernel keep the reference path.
    """
    on, total = 0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += 1
            if enabled:
                on += m.prepare_kernels()
            else:
                m._kernel = None
    return on, total


def cache_dequantized_weights(model: nn.Module, enabled: bool = True) -> None:
    """Keep (or stop keeping) every QuantLinear's fp32 dequantized weight between calls.

    For the reference path only: decoding then costs a float matmul per layer instead of a
    dequantization plus a matmul; numerics are unchanged. Memory: 4 bytes per quantized weight.
    """
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_weights = enabled
            m._weight_cache = None
