"""COMET FMPQ: fine-grained mixed-precision activation quantization, blocks of channels at 4 or 8 bits.

COMET (W4Ax) quantizes activations per token and block of ``block`` input channels; the few blocks
that hold outlier channels use 8 bits, all others 4. Outlier channels are scattered over K, so COMET
first reorders the channels (offline, from calibration statistics) so that the outliers share as few
blocks as possible; the same permutation is applied to the weight's input columns, which leaves the
GEMM's result unchanged (``x[:, perm] @ W[:, perm]^T == x @ W^T``).

Outlier definition used here: channel j is an outlier when its calibration absmax exceeds
``OUTLIER_FACTOR = 3`` times the median channel absmax. The median is robust to the outliers
themselves (a mean or standard deviation is dragged up by them), and the factor is where 4 bits
start to hurt: a per-block scale ``absmax / 7`` set by a channel 3x the typical magnitude leaves
typical channels only about 2 of the 7 positive levels. LLM outlier channels are 10-100x the median,
so they clear the bar by far, while ordinary spread between channels stays below it.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat
from lowbit.numerics.primitives import fake_quantize_activation

OUTLIER_FACTOR = 3.0


def outlier_channels(act_absmax: torch.Tensor) -> torch.Tensor:
    """(K,) bool: channels whose absmax exceeds ``OUTLIER_FACTOR`` x the median channel absmax."""
    a = act_absmax.float()
    return a > OUTLIER_FACTOR * a.median()


def assign_fmpq_blocks(
    act_absmax: torch.Tensor, block: int, high_fraction: float, bits_low: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel order and 8-bit blocks for FMPQ: ``(perm (K,) int64, high (n_blocks,) bool)``.

    ``act_absmax`` (K,): max |x_j| over calibration tokens. ``perm[i]`` is the original channel placed
    at position i: channels sorted by decreasing absmax (stable), so outliers fill the first blocks.
    ``n_blocks = ceil(K / block)`` (the last block may be partial). A block is 8-bit when it is among
    the first ``ceil(high_fraction * n_blocks)`` and holds at least one outlier channel (see the
    module docstring); at ``bits_low = 8`` every block is 8-bit already, so none is marked.
    """
    if act_absmax.ndim != 1 or act_absmax.shape[0] == 0:
        raise LowbitError(f"act_absmax must be a non-empty (K,) vector, got {tuple(act_absmax.shape)}")
    if block <= 0 or not 0.0 <= high_fraction <= 1.0 or bits_low not in (4, 8):
        raise LowbitError(
            "FMPQ needs block > 0, high_fraction in [0, 1] and bits_low 4 or 8, "
            f"got {block}, {high_fraction}, {bits_low}"
        )
    K = act_absmax.shape[0]
    perm = torch.argsort(act_absmax.float(), descending=True, stable=True)
    n_blocks = math.ceil(K / block)
    # tolerance: 0.3 * 10 is 3.0000000000000004 in binary floating point, which must give 3 blocks
    n_high = min(n_blocks, math.ceil(high_fraction * n_blocks - 1e-9))
    is_out = outlier_channels(act_absmax)[perm]  # in permuted order
    pad = torch.zeros(n_blocks * block - K, dtype=torch.bool, device=is_out.device)  # partial last block
    has_out = torch.cat([is_out, pad]).view(n_blocks, block).any(dim=1)
    high = has_out & (torch.arange(n_blocks, device=has_out.device) < n_high)
    if bits_low == 8:
        high = torch.zeros_like(high)
    return perm.to(torch.long), high


def fmpq_fake_quantize(
    x: torch.Tensor, perm: torch.Tensor, high: torch.Tensor, afmt: ActivationFormat
) -> torch.Tensor:
    """Quantize-dequantize ``x`` (..., K) with FMPQ, returned as (..., K) fp32 in the ORIGINAL channel order.

    Gathers ``x[..., perm]``, quantizes per token and block of ``afmt.fmpq_block`` channels (8 bits
    where ``high``, else ``afmt.bits``) with ``fake_quantize_activation``, and scatters the result back.
    """
    K = x.shape[-1]
    if afmt.fmpq_block is None or afmt.bits is None:
        raise LowbitError("fmpq_fake_quantize needs an activation format with bits and fmpq_block set")
    n_blocks = math.ceil(K / afmt.fmpq_block)
    if perm.shape != (K,) or high.shape != (n_blocks,):
        raise LowbitError(
            f"FMPQ for K={K}, block {afmt.fmpq_block} needs perm ({K},) and high ({n_blocks},), "
            f"got {tuple(perm.shape)} and {tuple(high.shape)}"
        )
    perm = perm.to(x.device)
    q = fake_quantize_activation(x[..., perm], afmt, fmpq_high=high)
    out = torch.empty_like(q)
    out[..., perm] = q
    return out
