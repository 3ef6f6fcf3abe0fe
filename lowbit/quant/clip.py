"""Clipping search: a per-output-channel ratio that shrinks the weight range before the scale is taken.

Round-to-nearest with the full range (``scale = absmax / 7.5`` at int4) spends levels on the few
largest weights; shrinking the range by a ratio ``r < 1`` clamps those weights but rounds all the
others more finely. AWQ (Lin et al. 2024, ``auto_clip``) and OdysseyLLM (W4A8) search ``r`` per
output channel to minimize the layer's output error on calibration data.

With ``H = 2/T * x^T x`` (K, K) (GPTQ's Hessian of the layer's squared output error), the output error
of row n is ``||x d_n||^2 / T = d_n^T H d_n / 2`` with ``d_n = w_n - fakeQ(w_n)``. Each output
channel's error depends only on its own row (its quantization groups never span rows), so
minimizing every row separately is the exact minimizer over the grid, and all rows are searched at
once.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats import WeightFormat
from lowbit.numerics.primitives import fake_quantize_weight


def _default_ratios() -> torch.Tensor:
    return torch.linspace(1.0, 0.5, 11)


def clip_error(w: torch.Tensor, H: torch.Tensor, wfmt: WeightFormat, ratio: torch.Tensor | None) -> torch.Tensor:
    """(N,) fp32: ``d_n^T H d_n`` for ``d = w - fakeQ_RTN(w, clip=ratio)``; ``ratio`` (N,) or None (no clip).

    ``w`` (N, K), ``H`` (K, K). Round-to-nearest with ``compute_scales(clip=ratio)`` (one ratio per
    row, applied to all of the row's groups).
    """
    w = w.float()
    d = w - fake_quantize_weight(w, wfmt, clip=ratio)
    return ((d @ H.float().to(w.device)) * d).sum(dim=1)


def search_clip(
    w: torch.Tensor, H: torch.Tensor, wfmt: WeightFormat, ratios: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-output-channel clipping ratio (N,) fp32 minimizing ``d_n^T H d_n`` over a grid.

    ``w`` (N, K) weights, ``H`` (K, K) the layer's Hessian ``2/T * x^T x`` from calibration inputs
    (any positive multiple gives the same answer), ``ratios`` the grid, default
    ``linspace(1.0, 0.5, 11)`` (AWQ searches down to 0.5 too). The ratio 1.0 is always a candidate
    (added if the grid lacks it) and wins ties, and ``clip = 1.0`` reproduces unclipped RTN bit for
    bit, so no row's error is ever above that of plain RTN.
    """
    if w.ndim != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise LowbitError(f"search_clip needs w (N, K) and H (K, K), got {tuple(w.shape)} and {tuple(H.shape)}")
    grid = (_default_ratios() if ratios is None else torch.as_tensor(ratios)).float().flatten().cpu()
    if grid.numel() == 0 or not ((grid > 0) & (grid <= 1)).all():
        raise LowbitError(f"clipping ratios must lie in (0, 1], got {grid.tolist()}")
    grid = torch.cat([torch.ones(1), grid[grid != 1.0]])  # 1.0 first: ties keep the unclipped range
    N = w.shape[0]
    best_err = torch.full((N,), float("inf"), device=w.device)
    best_ratio = torch.ones(N, device=w.device)
    for r in grid.tolist():
        ratio = torch.full((N,), r, device=w.device)
        err = clip_error(w, H, wfmt, ratio)
        better = err < best_err  # strict: an earlier (larger) ratio wins ties
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, ratio, best_ratio)
    return best_ratio
