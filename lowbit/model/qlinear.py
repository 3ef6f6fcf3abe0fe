"""QuantLinear: a Linear layer whose weight is stored quantized, with the reference (emulated) forward.

The layer owns its tensors; its GPU behaviour belongs to its format method (``lowbit.methods``). The
reference forward here defines the numerics every kernel must reproduce: it dequantizes the weight,
quantizes the activations exactly as the scheme says, and multiplies in fp32, on any device. On the
GPU, ``prepare_kernels`` asks the registry for the layer's method (``lowbit.methods.registry``), which
packs the buffers into its kernel layout once; the forward then hands x to ``method.apply``.

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

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, WeightFormat
from lowbit.kernels.activations import ActQuantSpec, QuantizedActivations
from lowbit.methods.base import FormatMethod
from lowbit.methods.registry import method_for
from lowbit.numerics.primitives import (
    dequantize_weight,
    fake_quantize_activation,
    num_groups,
    pack_int4,
    unpack_int4,
)
from lowbit.numerics.quantized import QuantizedWeight

_OPTIONAL = ("zeros", "g_idx", "bias", "smooth", "outlier_idx", "outlier_weight", "act_perm", "fmpq_high")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # bias and outlier weights: cast to the model's dtype
_CORRUPT = "the checkpoint is corrupt or was written by another tool"


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
        # set by prepare_kernels() when a GPU kernel takes this format: its method and packed weights
        self._method: FormatMethod | None = None
        self.kernel: Any = None
        # the activation dtype the kernels are packed for (prepare_kernels' act_dtype), None: unknown
        self.kernel_dtype: torch.dtype | None = None
        # release_checkpoint_layout(): qweight dropped, rebuilt from the kernel layout when asked for
        self._released = False

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
        cls,
        tensors: dict[str, torch.Tensor],
        in_features: int,
        wfmt: WeightFormat,
        afmt: ActivationFormat,
        *,
        out_features: int | None = None,
        describe: Callable[[str], str] | None = None,
    ) -> QuantLinear:
        """Rebuild from checkpoint tensors named without the layer prefix (``qweight``, ``scales``, ...).

        Every buffer is checked against the formats and the layer's shape (the module docstring's
        table) before it is used, so a damaged or foreign checkpoint fails here, naming the tensor,
        instead of as a shape error or NaN logits deep in a forward. ``describe(buffer)`` names a
        buffer in those errors (the loader passes the file and the full tensor name);
        ``out_features`` defaults to what ``scales`` says.
        """
        describe = describe or (lambda k: f"tensor {k!r}")
        unknown = [k for k in tensors if k not in ("qweight", "scales", *_OPTIONAL)]
        if unknown:
            raise LowbitError(f"{describe(unknown[0])} is not a quantized-layer tensor lowbit knows; "
                              "was the checkpoint written by a newer lowbit?")
        _check_missing(tensors, wfmt, afmt, describe)
        if out_features is None:
            if tensors["scales"].ndim != 2:
                raise LowbitError(f"{describe('scales')} has shape {tuple(tensors['scales'].shape)}, expected "
                                  f"(out_features, groups); {_CORRUPT}")
            out_features = tensors["scales"].shape[0]
        _check_buffers(tensors, in_features, out_features, wfmt, afmt, describe)
        m = cls(in_features, out_features, wfmt, afmt)
        for name, t in tensors.items():
            setattr(m, name, t)
        return m

    @classmethod
    def concat(cls, mods: list[QuantLinear]) -> QuantLinear | None:
        """One layer whose output is the concatenation of ``mods``' outputs (same input), or None when
        they differ in format, smoothing factors, act-order, outlier columns or FMPQ order and blocks.

        Layers that share their input (q/k/v, gate/up) get the same smoothing factors, outlier columns
        and FMPQ blocks from calibration (statistics are taken per input), so they merge; their
        outlier weights stack along the output channels like every other per-output buffer.
        """
        first = mods[0]
        same = all(m.wfmt == first.wfmt and m.afmt == first.afmt and m.in_features == first.in_features
                   for m in mods)
        if not same:
            return None
        # buffers that act on the shared input must be equal (or absent) in every layer
        for name in ("smooth", "g_idx", "outlier_idx", "act_perm", "fmpq_high"):
            ts = [getattr(m, name) for m in mods]
            if any(t is None for t in ts) != all(t is None for t in ts):
                return None
            if ts[0] is not None and not all(torch.equal(t, ts[0]) for t in ts):
                return None
        if any(m.bias is None for m in mods) != all(m.bias is None for m in mods):
            return None
        out = cls(first.in_features, sum(m.out_features for m in mods), first.wfmt, first.afmt)
        for name in ("qweight", "scales", "zeros", "bias", "outlier_weight"):  # all indexed by output channel first
            ts = [getattr(m, name) for m in mods]
            setattr(out, name, None if ts[0] is None else torch.cat(ts))
        for name in ("smooth", "g_idx", "outlier_idx", "act_perm", "fmpq_high"):
            setattr(out, name, getattr(first, name))
        return out

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must move these buffers but never re-round them: scales stay fp16, codes
        # integer, smoothing factors fp32. Only bias and outlier weights follow the model's dtype.
        self._restore_checkpoint_layout()  # the kernel layout goes below: qweight must exist first
        dtypes = {k: b.dtype for k, b in self._buffers.items() if b is not None}
        self._weight_cache = None
        self.kernel = self._method = None  # derived on one device: prepare_kernels() again after a move
        self.kernel_dtype = None  # a move may change the model's dtype: the next prepare_kernels says it
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

    @property
    def method(self) -> FormatMethod | None:
        """The format method whose GPU kernel runs this layer's formats and buffers, or None (reference
        only): ``lowbit.methods.registry.method_for``."""
        return method_for(self)

    def kernel_format(self) -> str | None:
        """The format name of the method that runs this layer on the GPU (``lowbit.methods.registry.METHODS``;
        the dispatch tables, bench paths and docs use the same names), or None."""
        method = self.method
        return None if method is None else method.name

    def pack_kernels(self, tile_k: int | None = None) -> Any:
        """This layer's weights in its method's kernel layout, on the buffers' device (CPU too: the tests
        run the kernels on it in Triton's interpreter); None when no method takes the format.
        ``tile_k``: the packed tile where the layout has a choice (None: its default)."""
        method = self.method
        return None if method is None else method.pack(self, tile_k)

    def prepare_kernels(self, act_dtype: torch.dtype | None = None) -> bool:
        """Pack the weights into the kernel layout on their current device; False if no kernel applies.
        ``act_dtype``: the dtype activations will come in (the model's), for layouts made for one
        (CUTLASS W4A16); None keeps the one given before, if any."""
        if act_dtype is not None:
            self.kernel_dtype = act_dtype
        method = None if self.qweight.device.type != "cuda" else self.method  # (restores a released qweight)
        if method is None:
            self.kernel = self._method = None
            return False
        from lowbit.kernels.dispatch import layout_tile

        method.check_device(self.qweight.device)
        tile_k = None if method.table_op is None else layout_tile(self.qweight.device, method.table_op)
        self.kernel, self._method = method.pack(self, tile_k), method
        return True

    def release_checkpoint_layout(self) -> int:
        """Drop ``qweight`` where the prepared kernel layout holds the same codes, so that the int4
        weights live once on the GPU; bytes freed (0 where the method cannot rebuild it, or the rebuild
        would differ). Anything that reads ``qweight`` afterwards (the reference forward, fusion, a
        device move) gets it back from the kernel layout, and ``state_dict`` rebuilds it for saving."""
        if self._method is None or self._released:
            return 0
        rebuilt = self._method.checkpoint_qweight(self, self.kernel)
        qweight = self._buffers["qweight"]
        if rebuilt is None or not torch.equal(rebuilt, qweight):
            return 0
        del rebuilt
        self._buffers["qweight"] = None
        self._released = True
        return qweight.nbytes

    def _restore_checkpoint_layout(self) -> None:
        if self.__dict__.get("_released"):
            self._buffers["qweight"] = self._method.checkpoint_qweight(self, self.kernel)
            self._released = False

    def __getattr__(self, name: str) -> Any:
        if name == "qweight" and self.__dict__.get("_released"):
            self._restore_checkpoint_layout()
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001, ANN202
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._released:  # rebuilt for the copy being saved, not kept
            destination[prefix + "qweight"] = self._method.checkpoint_qweight(self, self.kernel)

    def use_packed(self, packed: Any) -> None:
        """Run on ``packed`` (``pack_kernels``' result, on any device) through this layer's method: what
        ``prepare_kernels`` does on the GPU, for tests that run the kernels' CPU paths."""
        self._restore_checkpoint_layout()
        self.kernel, self._method = packed, (None if packed is None else self.method)

    def input_quant(self) -> ActQuantSpec | None:
        """How this layer's GPU kernel quantizes its input, when a fused kernel before it may do that
        instead (``lowbit.kernels.fused``): its method says (8-bit per-token formats, without act-order)."""
        return None if self._method is None else self._method.input_quant(self, self.kernel)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x through the prepared kernel (``prepare_kernels`` / ``use_packed``)."""
        if self._method is None:
            raise LowbitError("this layer has no kernel prepared; call prepare_kernels() on the GPU first")
        return self._method.apply(self, self.kernel, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype.

        With kernels prepared and x fp16/bf16 on the GPU: the dispatched kernel. Otherwise the
        reference, with the math in fp32 (the numerical spec every kernel is tested against).
        ``x`` may also be ``QuantizedActivations`` made by a fused kernel as ``input_quant`` asked.
        """
        if isinstance(x, QuantizedActivations):
            if self._method is None:
                raise LowbitError("pre-quantized activations reached a layer without an 8-bit-activation kernel")
            return self._method.apply_quantized(self, self.kernel, x)
        if self._method is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            return self._method.apply(self, self.kernel, x)
        # float64 inputs (calibration of an fp32 model) keep the quantization in fp32 (the spec) and take
        # the products in float64: their sums then do not depend on the device's reduction order
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.float()
        if self.smooth is not None:
            xf = xf / self.smooth
        y = None
        if self.outlier_idx is not None:
            y = xf[..., self.outlier_idx].to(acc) @ self.outlier_weight.to(acc).t()
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
        out = xq.to(acc) @ w.to(acc).t()
        if y is not None:
            out = out + y
        if self.bias is not None:
            out = out + self.bias.to(acc)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        w = f"w{self.wfmt.bits}{'' if self.wfmt.dtype == 'int' else '-fp8'}"
        g = f"g{self.wfmt.group_size}" if self.wfmt.group_size else "per-channel"
        a = f"a{self.afmt.bits}" if self.afmt.bits else "a16"
        n_out = 0 if self.outlier_idx is None else self.outlier_idx.numel()
        return f"{self.in_features}->{self.out_features}, {w} {g} {a}" + (f", {n_out} outliers" if n_out else "")


def _format_label(wfmt: WeightFormat, afmt: ActivationFormat) -> str:
    """E.g. "int4 weights, group 32" or "asymmetric int8 weights, per-channel, FMPQ blocks of 128"."""
    w = "fp8_e4m3" if wfmt.dtype == "fp8_e4m3" else f"{'' if wfmt.symmetric else 'asymmetric '}int{wfmt.bits}"
    g = f"group {wfmt.group_size}" if wfmt.group_size else "per-channel"
    return f"{w} weights, {g}" + (f", FMPQ blocks of {afmt.fmpq_block}" if afmt.fmpq_block else "")


def _check_missing(t: dict[str, torch.Tensor], wfmt: WeightFormat, afmt: ActivationFormat,
                   describe: Callable[[str], str]) -> None:
    """The buffers the formats need must all be there, and none that they exclude.

    ``g_idx`` and ``smooth`` stay optional: GPTQ's round-to-nearest fallback writes no g_idx even
    with act-order, and smoothing factors are kept only where no norm could absorb them.
    """
    asymmetric = wfmt.dtype == "int" and not wfmt.symmetric
    needed = ["qweight", "scales"] + (["zeros"] if asymmetric else [])
    if afmt.fmpq_block:  # without them COMET's channel order and 8-bit blocks would be silently lost
        needed += ["act_perm", "fmpq_high"]
    if "outlier_idx" in t or "outlier_weight" in t:  # QUIK: the columns and their weights come as a pair
        needed += ["outlier_idx", "outlier_weight"]
    label = _format_label(wfmt, afmt)
    for name in needed:
        if name not in t:
            raise LowbitError(f"{describe(name)} is missing (required for {label}); the checkpoint is "
                              "incomplete or was written by another tool")
    for name, excluded in (("zeros", not asymmetric), ("fmpq_high", not afmt.fmpq_block)):
        if excluded and name in t:
            raise LowbitError(f"{describe(name)} is unexpected for {label}; {_CORRUPT}")


def _check_buffers(t: dict[str, torch.Tensor], K: int, N: int, wfmt: WeightFormat, afmt: ActivationFormat,
                   describe: Callable[[str], str]) -> None:
    """Dtypes and shapes as the module docstring lists them, finite scales and factors, and indices in range."""
    label = _format_label(wfmt, afmt)

    def expect(name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor | None:
        x = t.get(name)
        if x is None:
            return None
        if x.dtype not in dtypes:
            want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise LowbitError(f"{describe(name)} has dtype {str(x.dtype).removeprefix('torch.')}, expected {want} "
                              f"for {label}; {_CORRUPT}")
        if tuple(x.shape) != shape:
            raise LowbitError(f"{describe(name)} has shape {tuple(x.shape)}, expected {shape} for {label}; {_CORRUPT}")
        return x

    def values(name: str, ok: bool, what: str) -> None:
        if not ok:
            raise LowbitError(f"{describe(name)} {what}; {_CORRUPT}")

    # outlier columns first: they decide Kq, the number of quantized columns every other shape uses
    out_idx = t.get("outlier_idx")
    if out_idx is not None:
        values("outlier_idx", out_idx.ndim == 1 and 0 < out_idx.numel() < K,
               f"has shape {tuple(out_idx.shape)}, expected (n,) with 0 < n < {K} (the layer's in_features)")
    n_out = 0 if out_idx is None else out_idx.numel()
    Kq = K - n_out
    G = num_groups(Kq, wfmt.group_size)
    if wfmt.bits == 4 and wfmt.dtype == "int":
        expect("qweight", (N, math.ceil(Kq / 2)), (torch.uint8,))  # two codes per byte (primitives.pack_int4)
    else:
        code = torch.float8_e4m3fn if wfmt.dtype == "fp8_e4m3" else torch.int8 if wfmt.symmetric else torch.uint8
        expect("qweight", (N, Kq), (code,))
    scales = expect("scales", (N, G), (torch.float16,))
    values("scales", bool(torch.isfinite(scales).all()), "holds NaN or Inf")
    zeros = expect("zeros", (N, G), (torch.uint8,))
    if zeros is not None:
        values("zeros", int(zeros.max()) < 2**wfmt.bits, f"holds zero points above {2**wfmt.bits - 1}")
    g_idx = expect("g_idx", (Kq,), (torch.int32,))
    if g_idx is not None and Kq:
        values("g_idx", int(g_idx.min()) >= 0 and int(g_idx.max()) < G, f"holds groups outside [0, {G})")
    expect("bias", (N,), _FLOATS)
    smooth = expect("smooth", (K,), (torch.float32,))
    if smooth is not None:  # a divisor of the input
        values("smooth", bool((torch.isfinite(smooth) & (smooth > 0)).all()), "holds NaN, Inf or non-positive factors")
    if out_idx is not None:
        expect("outlier_idx", (n_out,), (torch.int64,))
        ascending = bool((out_idx[1:] > out_idx[:-1]).all())
        values("outlier_idx", ascending and int(out_idx[0]) >= 0 and int(out_idx[-1]) < K,
               f"must hold ascending column indices in [0, {K})")
        w_out = expect("outlier_weight", (N, n_out), _FLOATS)
        values("outlier_weight", bool(torch.isfinite(w_out).all()), "holds NaN or Inf")
    perm = expect("act_perm", (Kq,), (torch.int64,))
    if perm is not None:
        values("act_perm", torch.equal(torch.sort(perm).values, torch.arange(Kq, device=perm.device)),
               f"is not a permutation of the {Kq} quantized columns")
    if afmt.fmpq_block:
        expect("fmpq_high", (math.ceil(Kq / afmt.fmpq_block),), (torch.bool,))


def input_quant(module: nn.Module | None) -> ActQuantSpec | None:
    """``module.input_quant()`` for a QuantLinear, None for anything else (fp16 Linear, None)."""
    return module.input_quant() if isinstance(module, QuantLinear) else None


def use_kernels(model: nn.Module, enabled: bool = True) -> tuple[int, int]:
    """Run every QuantLinear whose format has a GPU kernel through it (after the model is on the GPU).

    Returns (layers on kernels, quantized layers). Layers without a kernel keep the reference path.
    """
    on, total = 0, 0
    # the dtype its activations come in: that of its float parameters (embeddings, norms)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += 1
            if enabled:
                on += m.prepare_kernels(dtype)
            else:
                m.use_packed(None)
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


def linear_bits_per_weight(model: nn.Module) -> float:
    """Average storage bits per weight of the decoder's Linear layers (scales, zeros, outliers included)."""
    bits = weights = 0.0
    for module in model.layers.modules():
        if isinstance(module, QuantLinear):
            n, kq = module.out_features, module.quantized_in_features
            bits += n * kq * module.wfmt.bits_per_weight() + 16 * n * (module.in_features - kq)
            weights += n * module.in_features
        elif isinstance(module, torch.nn.Linear):
            bits += 16 * module.weight.numel()
            weights += module.weight.numel()
    return bits / weights
