"""Bit-exact building blocks: scales, quantize / dequantize, int4 packing, fp8 casts, activation fake-quant.

Every quantized number in lowbit is produced here, so these functions define the numerics that the
algorithms, the checkpoint and the kernels must agree on.

Weights, (N out, K in), grouped along K (``group_index``):
- symmetric int b-bit: ``scale = absmax / ((2**b - 1) / 2)`` (7.5 for int4, 127.5 for int8: the
  GPTQ / compressed-tensors convention, which uses all 2**b levels), codes
  ``clamp(round(w / scale), -2**(b-1), 2**(b-1) - 1)`` stored as int8; ``w_hat = code * scale``.
- asymmetric int b-bit: ``scale = (max - min) / (2**b - 1)`` over a range widened to include 0,
  ``zero = round(-min / scale)``, codes ``clamp(round(w / scale) + zero, 0, 2**b - 1)``;
  ``w_hat = (code - zero) * scale``.
- fp8 e4m3: ``scale = absmax / 448``, codes ``(w / scale).to(float8_e4m3fn)``; ``w_hat = code * scale``.
Scales are rounded to fp16 *before* the codes are computed, because fp16 is what the checkpoint and
the kernels keep; dequantizing with the stored scale then reproduces exactly what was optimized.

Activations, dynamic per token (row): symmetric with ``scale = absmax / (2**(b-1) - 1)`` (127 / 7,
SmoothQuant's convention, so -2**(b-1) is never produced), fp8 with ``absmax / 448``.

int4 packing: two codes per byte along K, column ``2j`` in the low nibble and ``2j+1`` in the high
nibble, signed codes as 4-bit two's complement; an odd K is padded with a zero code.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, WeightFormat

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): keeps all-zero groups from dividing by 0


def group_index(K: int, group_size: int | None, device: torch.device | str | None = None) -> torch.Tensor:
    """(K,) int64 on ``device`` (default CPU): the group of each input column in natural order (the last
    group may be shorter). Made where it is used: a host-to-device copy waits for the GPU's queue,
    and GPTQ's column loop calls this once per column."""
    if group_size is None:
        return torch.zeros(K, dtype=torch.long, device=device)
    return torch.arange(K, device=device) // group_size


def _column_groups(K: int, fmt: WeightFormat, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(K,) group of each column: ``g_idx`` if given (act-order), else natural order."""
    return group_index(K, fmt.group_size, device) if g_idx is None else g_idx.to(device)


def num_groups(K: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(K / group_size)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _to_fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=_FP16_TINY, max=65504.0).to(torch.float16)


def _divisor(value: float, device: torch.device) -> torch.Tensor:
    """A 0-dim fp32 tensor on ``device`` (a fill: no host-to-device copy, CUDA-graph safe)."""
    return torch.full((), float(value), device=device)


def _group_max_min(w: torch.Tensor, group_size: int | None, G: int,
                   g_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group max and min (N, G) fp32 of ``w`` (N, K) fp32; exact, so any method gives the same bits.

    Natural-order groups are contiguous column ranges: a reshape to (N, G, group_size) and one
    reduction. Only act-order groups (``g_idx`` (K,), on ``w``'s device) need ``scatter_reduce``, which on CUDA serializes the
    writes to one output on atomics: per channel (every column into one group) it took 14 ms on a
    28672 x 4096 weight on an H100, 55% of a Llama-3-8B layer's w4a8 calibration (2026-12-05 profile).
    """
    N, K = w.shape
    if g_idx is not None:
        idx = g_idx.expand(N, K)
        wmax = torch.full((N, G), -math.inf, device=w.device).scatter_reduce(1, idx, w, "amax")
        wmin = torch.full((N, G), math.inf, device=w.device).scatter_reduce(1, idx, w, "amin")
        return wmax, wmin
    if group_size is None or G == 1:
        return w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    pad = G * group_size - K
    if pad:  # a shorter last group: repeat its last column, which moves neither its max nor its min
        w = torch.cat([w, w[:, -1:].expand(N, pad)], dim=1)
    wg = w.reshape(N, G, group_size)
    return wg.amax(dim=2), wg.amin(dim=2)


def compute_scales(
    w: torch.Tensor, fmt: WeightFormat, clip: torch.Tensor | None = None, g_idx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (N, G) fp16 and zero points (N, G) uint8 (None if symmetric) for ``w`` (N, K).

    ``clip`` (N,) or (N, G) in (0, 1] shrinks each row's range before the scale is taken (clipping
    search). ``g_idx`` (K,) assigns columns to groups (act-order without static groups); default
    ``group_index(K, fmt.group_size)``.
    """
    N, K = w.shape
    w = w.float()
    G = num_groups(K, fmt.group_size)
    wmax, wmin = _group_max_min(w, fmt.group_size, G, None if g_idx is None else g_idx.to(w.device))
    if clip is not None:
        c = clip.float().to(w.device)
        c = c[:, None] if c.ndim == 1 else c
        wmax, wmin = wmax * c, wmin * c
    # Divisors are device tensors, not Python numbers: CUDA divides by a host scalar by multiplying
    # with its reciprocal (not IEEE), which moves a scale by an fp32 ulp against the CPU's and, now and
    # then, across an fp16 rounding boundary (see quantize_activation)
    if fmt.dtype == "fp8_e4m3":
        return _to_fp16_scale(torch.maximum(wmax.abs(), wmin.abs()) / _divisor(FP8_MAX, w.device)), None
    if fmt.symmetric:
        absmax = torch.maximum(wmax.abs(), wmin.abs())
        return _to_fp16_scale(absmax / _divisor((2**fmt.bits - 1) / 2, w.device)), None
    wmax, wmin = wmax.clamp(min=0), wmin.clamp(max=0)
    qmax = 2**fmt.bits - 1
    scale = _to_fp16_scale((wmax - wmin) / _divisor(qmax, w.device))
    zero = torch.round(-wmin / scale.float()).clamp(0, qmax).to(torch.uint8)
    return scale, zero


def quantize_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    fmt: WeightFormat,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes of ``w`` (N, K): int8 for int formats (signed if symmetric, 0..2**b-1 if not), float8 for fp8."""
    g = _column_groups(w.shape[1], fmt, g_idx, w.device)
    s = scale.float()[:, g]  # (N, K)
    if fmt.dtype == "fp8_e4m3":
        return (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    lo, hi = int_range(fmt.bits, fmt.symmetric)
    q = torch.round(w.float() / s)
    if zero is not None:
        q = q + zero.float()[:, g]
    return q.clamp(lo, hi).to(torch.int8 if fmt.symmetric else torch.uint8)


def dequantize_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    fmt: WeightFormat,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 (N, K) weights from codes, fp16 scales and zero points."""
    g = _column_groups(codes.shape[1], fmt, g_idx, codes.device)
    q = codes.float()
    if zero is not None:
        q = q - zero.float()[:, g]
    return q * scale.float()[:, g]


def fake_quantize_weight(w: torch.Tensor, fmt: WeightFormat, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize (fp32), with natural-order groups."""
    scale, zero = compute_scales(w, fmt, clip)
    return dequantize_weight(quantize_weight(w, scale, zero, fmt), scale, zero, fmt)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 in [-8, 7] or uint8 in [0, 15] -> (N, ceil(K/2)) uint8, even columns in the low nibble."""
    N, K = codes.shape
    if codes.dtype not in (torch.int8, torch.uint8):
        raise LowbitError(f"int4 codes must be int8 or uint8, got {codes.dtype}")
    nib = codes.to(torch.int16) & 0xF
    if K % 2:
        nib = torch.cat([nib, torch.zeros(N, 1, dtype=nib.dtype, device=nib.device)], dim=1)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, K: int, signed: bool) -> torch.Tensor:
    """Inverse of ``pack_int4``: (N, ceil(K/2)) uint8 -> (N, K) int8 (signed) or uint8."""
    p = packed.to(torch.int16)
    nib = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).reshape(p.shape[0], -1)[:, :K]
    if signed:
        return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)
    return nib.to(torch.uint8)


def quantize_activation(
    x: torch.Tensor, bits: int, dtype: str = "int"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (last dim) quantization: codes (int8 or float8, same shape) and fp32 scales (..., 1)."""
    absmax = x.float().abs().amax(dim=-1, keepdim=True)
    # Divide by a device tensor, not a Python number: PyTorch's CUDA division multiplies by the
    # reciprocal of a host scalar (not IEEE), which would make the spec differ by an ulp between
    # CPU and GPU; the kernels (lowbit.kernels.act_quant) divide exactly.
    qmax = FP8_MAX if dtype == "fp8_e4m3" else 2 ** (bits - 1) - 1
    # (a fill, not torch.tensor(): a host-to-device copy cannot be captured in a CUDA graph)
    scale = (absmax / torch.full((), float(qmax), device=x.device)).clamp(min=1e-12)
    if dtype == "fp8_e4m3":
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    return torch.round(x.float() / scale).clamp(-qmax, qmax).to(torch.int8), scale


def fake_quantize_activation(
    x: torch.Tensor, fmt: ActivationFormat, fmpq_high: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize activations (..., K) as ``fmt`` says, in fp32.

    Without FMPQ: one scale per token over all K channels. With FMPQ (COMET): one scale per token
    and block of ``fmt.fmpq_block`` channels, at 8 bits where ``fmpq_high`` (n_blocks,) is True, else
    at ``fmt.bits``. Outlier columns are not handled here: the caller splits them off first.
    """
    if fmt.bits is None:
        return x.float()
    if fmt.fmpq_block is None:
        codes, scale = quantize_activation(x, fmt.bits, fmt.dtype)
        return codes.float() * scale
    K, B = x.shape[-1], fmt.fmpq_block
    n_blocks = math.ceil(K / B)
    high = torch.zeros(n_blocks, dtype=torch.bool) if fmpq_high is None else fmpq_high.cpu()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for b in range(n_blocks):
        sl = slice(b * B, min(K, (b + 1) * B))
        codes, scale = quantize_activation(x[..., sl], 8 if bool(high[b]) else fmt.bits, fmt.dtype)
        out[..., sl] = codes.float() * scale
    return out
