"""N:M structured sparsity (2:4 for Sparse-Marlin / cuSPARSELt): mask selection and a checker.

SparseGPT (Frantar & Alistarh 2023, ``prunen`` / ``prunem`` in its ``fasterprune``) picks, in every
group of ``m`` consecutive input columns of a row, the ``n`` weights with the smallest OBS saliency
``w**2 / [H^-1]_cc**2``, where ``[H^-1]_cc`` is the diagonal of the upper Cholesky factor of the inverse
Hessian over the columns not yet processed. With ``hinv_diag`` all ones this is magnitude pruning.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def select_n_of_m(w_block: torch.Tensor, hinv_diag: torch.Tensor, n: int = 2) -> torch.Tensor:
    """Bool mask (N, m), True = prune: the ``n`` smallest ``w**2 / hinv_diag**2`` of each row."""
    if w_block.ndim != 2 or hinv_diag.shape != (w_block.shape[1],):
        raise LowbitError(f"select_n_of_m needs w_block (N, m) and hinv_diag (m,), got {tuple(w_block.shape)} "
                          f"and {tuple(hinv_diag.shape)}")
    if not 0 <= n <= w_block.shape[1]:
        raise LowbitError(f"cannot prune {n} of {w_block.shape[1]} weights")
    saliency = w_block.float() ** 2 / hinv_diag.float().to(w_block.device)[None, :] ** 2
    idx = torch.topk(saliency, n, dim=1, largest=False).indices  # (N, n)
    return torch.zeros(saliency.shape, dtype=torch.bool, device=w_block.device).scatter_(1, idx, True)


def is_2of4(codes: torch.Tensor) -> bool:
    """True if every row of ``codes`` (N, K) has at most 2 non-zeros in each group of 4 columns.

    That is the hardware constraint; a kept weight may itself round to code 0, so a group can hold
    more than 2 zeros. K must be a multiple of 4.
    """
    N, K = codes.shape
    if K % 4:
        return False
    nonzero = (codes.float() != 0).reshape(N, K // 4, 4).sum(-1)
    return bool((nonzero <= 2).all())
