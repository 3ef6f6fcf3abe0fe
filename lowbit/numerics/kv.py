"""KV cache quantization: the reference (fake-quantized) numerics and fp8 scale calibration.

Caches are (B, heads, T, head_dim). Integer caches (int8 / int4) are quantized dynamically and
symmetrically when written, one scale per (token, head) or per (token, head, group of
``group_size`` head_dim channels) as in KIVI / COMET's 4-bit KV cache: ``scale = absmax /
(2**(b-1) - 1)``, codes ``clamp(round(t / scale), -qmax, qmax)`` (the same convention as the
per-token activations in ``primitives.quantize_activation``, which does the arithmetic here).
fp8 e4m3 caches use one static scale per head from calibration (``calibrate_kv_scales``, as vLLM's
``k_scale`` / ``v_scale``) or, without one, a dynamic scale per (token, head) ``absmax / 448``.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats import KVCacheFormat
from lowbit.numerics.primitives import FP8_MAX, quantize_activation


def fake_quantize_kv(
    t: torch.Tensor, fmt: KVCacheFormat, static_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize a K or V tensor ``t`` (B, heads, T, head_dim); same shape and dtype as ``t``.

    fp16: returned as is. int8 / int4: dynamic per (token, head[, group]) as in the module docstring;
    ``head_dim`` must be a multiple of ``fmt.group_size``. fp8_e4m3: ``static_scale`` (heads,) fp32 if
    given (values beyond ``448 * scale`` are clamped), else dynamic per (token, head). Math in fp32.
    """
    if t.ndim != 4:
        raise LowbitError(f"KV tensors are (B, heads, T, head_dim), got shape {tuple(t.shape)}")
    if fmt.dtype == "fp16":
        return t
    B, Hh, T, D = t.shape
    if fmt.dtype == "fp8_e4m3":
        if static_scale is None:
            codes, scale = quantize_activation(t, 8, "fp8_e4m3")  # per (b, head, token) row of head_dim
            return (codes.float() * scale).to(t.dtype)
        if static_scale.shape != (Hh,):
            raise LowbitError(f"a static fp8 KV scale is one per head ({Hh},), got {tuple(static_scale.shape)}")
        s = static_scale.float().to(t.device).view(1, Hh, 1, 1)
        codes = (t.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return (codes.float() * s).to(t.dtype)
    if static_scale is not None:
        raise LowbitError(f"{fmt.dtype} KV caches use dynamic scales; static scales are for fp8_e4m3")
    g = fmt.group_size or D
    if D % g:
        raise LowbitError(f"head_dim {D} is not a multiple of the KV group size {g}")
    codes, scale = quantize_activation(t.reshape(B, Hh, T, D // g, g), fmt.bits)
    return (codes.float() * scale).reshape(B, Hh, T, D).to(t.dtype)


def calibrate_kv_scales(absmax: torch.Tensor) -> torch.Tensor:
    """Static fp8 KV scales (heads,) fp32 from each head's calibration absmax (heads,): ``absmax / 448``."""
    return (absmax.float() / FP8_MAX).clamp(min=1e-8)
