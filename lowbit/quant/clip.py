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

Device independence: ``d`` is elementwise fp32 arithmetic (the same bits on any device), the form
``d^T H d`` is taken in float64, and ratios whose errors lie within ``RTOL`` (relative) of a row's
best are ties, which go to the largest ratio (the least clipping). A choice therefore changes only
when the inputs move an error across that margin, not with the reduction order of a matmul.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats import WeightFormat
from lowbit.numerics.primitives import fake_quantize_weight


RTOL = 1e-3  # errors within this fraction of a row's best are ties (won by the largest ratio)


def _default_ratios() -> torch.Tensor:
    return torch.linspace(1.0, 0.5, 11)


def _clip_error64(w: torch.Tensor, H64: torch.Tensor, wfmt: WeightFormat, ratio: torch.Tensor | None) -> torch.Tensor:
    """(N,) float64 ``d_n^T H d_n``: ``d`` in fp32 (exactly what RTN produces), the quadratic form in float64."""
    w = w.float()
    d = (w - fake_quantize_weight(w, wfmt, clip=ratio)).double()
    return ((d @ H64) * d).sum(dim=1)


def clip_error(w: torch.Tensor, H: torch.Tensor, wfmt: WeightFormat, ratio: torch.Tensor | None) -> torch.Tensor:
    """(N,) fp32: ``d_n^T H d_n`` for ``d = w - fakeQ_RTN(w, clip=ratio)``; ``ratio`` (N,) or None (no clip).

    ``w`` (N, K), ``H`` (K, K). Round-to-nearest with ``compute_scales(clip=ratio)`` (one ratio per
    row, applied to all of the row's groups). Computed in float64 (see the module docstring), rounded
    to fp32.
    """
    return _clip_error64(w, H.to(w.device, torch.float64), wfmt, ratio).float()


def search_clip(
    w: torch.Tensor, H: torch.Tensor, wfmt: WeightFormat, ratios: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-output-channel clipping ratio (N,) fp32 minimizing ``d_n^T H d_n`` over a grid.

    ``w`` (N, K) weights, ``H`` (K, K) the layer's Hessian ``2/T * x^T x`` from calibration inputs
    (any positive multiple gives the same answer), ``ratios`` the grid, default
    ``linspace(1.0, 0.5, 11)`` (AWQ searches down to 0.5 too). The ratio 1.0 is always a candidate
    (added if the grid lacks it), and ``clip = 1.0`` reproduces unclipped RTN bit for bit. Each row
    takes the largest ratio whose error is within ``RTOL`` of the row's smallest (ties and near-ties
    keep more of the range), so no row's error is ever above that of plain RTN, and a perturbation of
    the inputs that moves no error across that margin leaves every choice as it was.
    """
    if w.ndim != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise LowbitError(f"search_clip needs w (N, K) and H (K, K), got {tuple(w.shape)} and {tuple(H.shape)}")
    grid = (_default_ratios() if ratios is None else torch.as_tensor(ratios)).float().flatten().cpu()
    if grid.numel() == 0 or not ((grid > 0) & (grid <= 1)).all():
        raise LowbitError(f"clipping ratios must lie in (0, 1], got {grid.tolist()}")
    grid = torch.cat([torch.ones(1), grid[grid != 1.0]]).unique()  # 1.0 always a candidate, no duplicates
    N = w.shape[0]
    H64 = H.to(w.device, torch.float64)
    errs = torch.stack([_clip_error64(w, H64, wfmt, torch.full((N,), r, device=w.device)) for r in grid.tolist()], 1)
    best = errs.min(dim=1, keepdim=True).values  # (N, 1)
    tied = errs <= best + RTOL * best.abs()  # the best itself always, so some ratio is always picked
    ratios = grid.to(w.device)[None, :].expand(N, -1)
    return torch.where(tied, ratios, torch.zeros_like(ratios)).amax(dim=1).float()
