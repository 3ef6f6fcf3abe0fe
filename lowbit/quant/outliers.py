"""QUIK (Ashkboos et al. 2023): keep a few outlier input channels of the activations in fp16.

QUIK quantizes activations to 4 bits except for a fixed set of input channels, chosen once from
calibration data as the channels with the largest activation magnitude; those columns of the
activations (and the matching columns of the weights) go through an fp16 GEMM, the rest through the
low-bit one, and the two partial products are added.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def select_outlier_columns(act_absmax: torch.Tensor, n: int) -> torch.Tensor:
    """The ``min(n, K)`` input channels with the largest calibration absmax, as a sorted (n,) int64 tensor.

    ``act_absmax`` (K,): max |x_j| over calibration tokens (QUIK ranks channels by activation
    magnitude). ``n = 0`` gives an empty tensor; ties are broken by ``torch.topk``.
    """
    if act_absmax.ndim != 1:
        raise LowbitError(f"act_absmax must be (K,), got {tuple(act_absmax.shape)}")
    if n < 0:
        raise LowbitError(f"the number of outlier columns must be >= 0, got {n}")
    k = min(int(n), act_absmax.shape[0])
    idx = torch.topk(act_absmax.float(), k).indices
    return torch.sort(idx).values.to(torch.long)


def split_columns(K: int, outlier_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept_idx, outlier_idx)``: complementary sorted int64 index sets partitioning ``0..K-1``.

    ``outlier_idx`` (n,) distinct indices in ``[0, K)``, any order; the results live on its device.
    """
    out = torch.sort(outlier_idx.to(torch.long).flatten()).values
    if out.numel() and (out[0] < 0 or out[-1] >= K or (out[1:] == out[:-1]).any()):
        raise LowbitError(f"outlier columns must be distinct indices in [0, {K}), got {outlier_idx.tolist()}")
    mask = torch.ones(K, dtype=torch.bool, device=out.device)
    mask[out] = False
    return torch.nonzero(mask).flatten(), out
