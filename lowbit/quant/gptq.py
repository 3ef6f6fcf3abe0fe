"""GPTQ (Frantar et al. 2022) and SparseGPT 2:4 (Frantar & Alistarh 2023), plus round-to-nearest.

Pure PyTorch on whatever device the inputs are on. Split, as llm-compressor does
(``modifiers/gptq/gptq_quantize.py``), into small functions: collect a Hessian with
``make_empty_hessian`` / ``accumulate_hessian``, then ``gptq_quantize`` one Linear.

Precision, chosen so that the result does not depend on the device: the Hessian is accumulated in
float64 and the dampened Hessian is factorized and inverted in float64; only the column sweep runs in
fp32. A sum of 2 x^T x over 65k tokens in fp32 carries rounding errors of order 1e-6 whose pattern
depends on the reduction order (CPU BLAS and cuBLAS differ), and GPTQ multiplies them by the condition
number of the dampened Hessian (up to 5e4 on SmolLM2-135M's o_proj): in fp32 the factor U differed
from its float64 value by up to 1e-3 there, now by fp32 rounding (about 1e-7).

GPTQ quantizes the columns of W (N out x K in) one at a time and spreads each column's error over the
columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss
``||W X - W_hat X||^2`` (H = 2 X^T X / n_tokens). Following the reference implementation:

- H gets ``damp * mean(diag(H))`` on its diagonal; dead inputs (``H_ii == 0``, never active) get
  ``H_ii = 1`` and a zero weight column.
- The updates use the upper Cholesky factor U of H^-1: for column c, ``err = (w_c - q_c) / U_cc``
  and ``W[:, c:] -= err U[c, c:]``, applied lazily per block of ``block_size`` columns.
- Group scales are taken from the error-updated weights when a group's first column is reached,
  exactly as the reference does: from W as updated by all previous blocks, i.e. without the lazy
  updates of the current block's earlier columns (identical when groups start at block starts).
  Applying those pending updates first changed the output error by 0.1-0.2% on average over 8
  random layers (group 32 and 64 in blocks of 128), so bit-compatibility with the reference wins.
- ``act_order`` processes columns by decreasing ``diag(H)``; ``static_groups`` then fixes the groups
  and their scales up-front on the original weights in natural order (MARLIN's format, no g_idx).

fp8_e4m3 weights are only rounded to nearest: the fp8 grid's relative error is nearly uniform across
magnitudes, and per-channel fp8 is already close to lossless, so error feedback buys little there.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from lowbit.errors import LowbitError
from lowbit.formats import WeightFormat
from lowbit.kernels import gptq_sweep
from lowbit.numerics.primitives import compute_scales, int_range, num_groups, quantize_weight
from lowbit.numerics.quantized import QuantizedWeight
from lowbit.quant.sparse import select_n_of_m

_CHOLESKY_RETRIES = 3  # each retry multiplies the dampening by 10


HESSIAN_DTYPE = torch.float64  # accumulation and inversion; see the module docstring


def make_empty_hessian(K: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(K, K) float64 zeros, the start of ``accumulate_hessian``."""
    return torch.zeros(K, K, dtype=HESSIAN_DTYPE, device=device)


def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, n_seen: int) -> tuple[torch.Tensor, int]:
    """Fold activations ``x`` (..., K) into ``H``, kept as the mean of ``2 x^T x`` over all tokens.

    ``H`` is updated in place (a 14336-wide float64 Hessian is 1.6 GB) and returned with the new token
    count. Keeping the mean rather than the sum makes H, and hence the dampening, independent of how
    many calibration tokens were used. The products and sums are taken in ``H``'s dtype (float64 from
    ``make_empty_hessian``: x of any float dtype is exact in it, so the result is within float64
    rounding of the exact mean, however the tokens are chunked and on whatever device).
    """
    K = H.shape[0]
    if x.shape[-1] != K:
        raise LowbitError(f"activations have {x.shape[-1]} channels but the Hessian is {K}x{K}")
    x = x.reshape(-1, K).to(device=H.device, dtype=H.dtype)
    n_new = x.shape[0]
    if n_new == 0:
        return H, n_seen
    total = n_seen + n_new
    H.mul_(n_seen / total)
    H.addmm_(x.T, x, alpha=2.0 / total)
    return H, total


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``trace((w - w_hat) H (w - w_hat)^T) / N``: the expected squared output error per output channel
    (with H = 2 E[x^T x], twice the output MSE summed over a token's outputs, averaged over rows)."""
    d = (w.float() - w_hat.float().to(w.device)).double()  # the difference in fp32, the form in float64
    return float(((d @ H.to(w.device, torch.float64)) * d).sum() / d.shape[0])


def rtn_quantize(w: torch.Tensor, fmt: WeightFormat, clip: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest with natural-order groups; ``clip`` (N,) or (N, G) ratios shrink the ranges."""
    scale, zero = compute_scales(w, fmt, clip)
    return QuantizedWeight(fmt, quantize_weight(w, scale, zero, fmt), scale, zero)


def _check_inputs(w: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, keep_columns: torch.Tensor | None,
                  name: str) -> None:
    if w.ndim != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise LowbitError(f"GPTQ needs weights (N, K) and a (K, K) Hessian, got {tuple(w.shape)} and {tuple(H.shape)}")
    if not torch.isfinite(w).all():
        raise LowbitError(f"the weights of {name} contain NaN or Inf; the checkpoint (or an earlier transform) "
                          "is corrupt")
    if not torch.isfinite(H).all():
        raise LowbitError(
            f"the calibration activations (Hessian) of {name} contain NaN or Inf; check the calibration data and "
            "the layers before this one (an overflow in fp16 is the usual cause: try --dtype fp32)"
        )
    if fmt.sparsity == "2:4" and (fmt.dtype != "int" or not fmt.symmetric or fmt.act_order):
        raise LowbitError("2:4 sparsity needs a symmetric int weight format without act_order")
    if keep_columns is not None:
        K = w.shape[1]
        kc = keep_columns
        if kc.ndim != 1 or kc.dtype not in (torch.int32, torch.int64):
            raise LowbitError("keep_columns must be a 1-D integer tensor of column indices")
        if kc.numel() and (int(kc.min()) < 0 or int(kc.max()) >= K or kc.unique().numel() != kc.numel()):
            raise LowbitError(f"keep_columns must be distinct column indices in [0, {K})")
        if kc.numel() >= K:
            raise LowbitError("keep_columns leaves no column to quantize")


def _split_columns(K: int, keep: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(remaining (K_q,) in original order, keep (n_keep,) as given), both int64 on ``device``."""
    keep = torch.empty(0, dtype=torch.long) if keep is None else keep.long().cpu()
    is_kept = torch.zeros(K, dtype=torch.bool)
    is_kept[keep] = True
    return torch.nonzero(~is_kept).flatten().to(device), keep.to(device)


def _inverse_hessian_cholesky(H: torch.Tensor, damp: float, name: str) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + damp * mean(diag(H)) I)^-1, retrying with 10x dampening; None if all fail.

    Computed in float64 whatever ``H``'s dtype (the factorization is where rounding errors are
    amplified by the condition number), returned in fp32 for the sweep. ``name`` (the layer) goes into
    the warnings: a model has hundreds of Linears, and the fallback is worth knowing about only if one
    can tell which layer lost GPTQ's error feedback.
    """
    H = H.to(HESSIAN_DTYPE)
    diag = torch.arange(H.shape[0], device=H.device)
    mean_diag = float(H.diagonal().mean())
    for attempt in range(_CHOLESKY_RETRIES + 1):
        d = damp * 10**attempt
        Hd = H.clone()
        Hd[diag, diag] += d * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U.float()
        if attempt < _CHOLESKY_RETRIES:
            warnings.warn(
                f"GPTQ: Cholesky of the dampened Hessian of {name} failed (damp={d:g}); retrying with "
                f"damp={10 * d:g}. If this recurs, use more (or more varied) calibration tokens or raise damp.",
                RuntimeWarning,
                stacklevel=3,
            )
    # llm-compressor also falls back rather than failing the whole run: one RTN layer costs a little
    # accuracy, and the user is told how to avoid it
    warnings.warn(
        f"GPTQ: Cholesky of the Hessian of {name} failed even with damp={d:g} (its calibration activations "
        "are degenerate or not positive semi-definite); falling back to round-to-nearest for this layer. "
        "To quantize it with GPTQ, calibrate on more (or more varied) samples: raise --samples or use "
        "another --calib text.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _fallback(w: torch.Tensor, fmt: WeightFormat, clip, remaining, keep) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """RTN on the remaining columns (magnitude 2:4 pruning first if asked); kept columns unchanged."""
    wq = w[:, remaining]
    if fmt.sparsity == "2:4":
        N, Kq = wq.shape
        mask = select_n_of_m(wq.reshape(-1, 4), torch.ones(4, device=w.device)).reshape(N, Kq)
        wq = wq.masked_fill(mask, 0.0)
    qw = rtn_quantize(wq, fmt, clip)
    return qw, (w[:, keep].clone() if keep.numel() else None)


def _clip_for_group(clip: torch.Tensor | None, g: int) -> torch.Tensor | None:
    if clip is None or clip.ndim == 1:
        return clip
    return clip[:, g]


def _gptq_blocks(
    W: torch.Tensor,
    U: torch.Tensor,
    K_q: int,
    fmt: WeightFormat,
    pos_group: list[int],
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    dynamic: bool,
    block_size: int,
    clip: torch.Tensor | None,
) -> torch.Tensor:
    """The GPTQ / SparseGPT sweep over the first ``K_q`` columns of ``W`` (processing order), in place.

    ``W`` (N, K) is updated with every column's error; columns from ``K_q`` on are never quantized but
    absorb the error of all the others. ``scale`` / ``zero`` (N, G) are filled for groups whose first
    column is reached when ``dynamic``. Returns the codes (N, K_q) in processing order.
    """
    N = W.shape[0]
    gs = fmt.group_size
    col_fmt = replace(fmt, group_size=None)  # the primitives on one group at a time
    sparse = fmt.sparsity == "2:4"
    lo, hi = int_range(fmt.bits, fmt.symmetric)
    codes = torch.empty(N, K_q, dtype=torch.int8 if fmt.symmetric else torch.uint8, device=W.device)
    groups = torch.tensor(pos_group, device=W.device)
    for i1 in range(0, K_q, block_size):
        i2 = min(i1 + block_size, K_q)
        if dynamic:
            # Scales of the groups that start in this block, from W as updated by all previous blocks
            # (as the reference: not yet by this block's earlier columns, whose updates are applied
            # lazily at the block's end; W itself does not change inside a block, so taking them all
            # here is what taking each at its first column would give).
            for p in range(i1 + (-i1) % gs, i2, gs):
                g = pos_group[p]
                sg, zg = compute_scales(W[:, p : min(p + gs, K_q)], col_fmt, _clip_for_group(clip, g))
                scale[:, g : g + 1] = sg
                if zero is not None:
                    zero[:, g : g + 1] = zg
        cols = groups[i1:i2]
        s_blk = scale[:, cols].float()  # (N, B): each column's scale and zero point
        z_blk = None if zero is None else zero[:, cols].float()
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        if sparse:
            c_blk, Err1 = gptq_sweep.sweep_block_reference(W1, U1, s_blk, z_blk, lo, hi, prune=select_n_of_m)
        elif W.is_cuda:
            c_blk, Err1 = gptq_sweep.sweep_block(W1, U1.contiguous(), s_blk, z_blk, lo, hi)
        else:
            c_blk, Err1 = gptq_sweep.sweep_block_reference(W1, U1, s_blk, z_blk, lo, hi)
        codes[:, i1:i2] = c_blk
        # the lazy update's products in float64, rounded once to fp32: an fp32 matmul's sums depend on
        # the device's reduction order (CPU BLAS against cuBLAS), and a code that flips here moves every
        # later decision of the layer; W itself stays fp32 (the subtraction is elementwise, the same
        # bits on any device). On Hopper float64 GEMMs run at the fp32 rate.
        W[:, i2:] -= (Err1.double() @ U[i1:i2, i2:].double()).float()
    return codes


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    fmt: WeightFormat,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    clip: torch.Tensor | None = None,
    keep_columns: torch.Tensor | None = None,
    name: str = "this layer",
) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """Quantize ``w`` (N, K) with GPTQ against the Hessian ``H`` (K, K) from ``accumulate_hessian``.

    Returns the QuantizedWeight over the quantized columns (codes in original column order) and, when
    ``keep_columns`` (QUIK outliers) is given, their error-updated float weights (N, n_keep) fp32 in
    ``keep_columns`` order, else None. Kept columns are processed last, so they absorb the error of
    every quantized column; the QuantizedWeight then covers the other K - n_keep columns in their
    original relative order, with groups formed over those.

    ``clip`` (N,) (or (N, G), G the groups of the result) shrinks the range of every scale.
    ``fmt.sparsity == "2:4"`` prunes jointly with quantization, as SparseGPT: in each group of 4
    columns the 2 weights of least saliency get code 0 and their error is compensated like
    quantization error. If the Cholesky factorization fails even after dampening retries, this warns
    and falls back to round-to-nearest. ``name`` (e.g. ``layers.3.self_attn.q_proj``) names the layer
    in warnings and errors.
    """
    _check_inputs(w, H, fmt, keep_columns, name)
    device = w.device
    N, K = w.shape
    remaining, keep = _split_columns(K, keep_columns, device)
    K_q = remaining.numel()
    G = num_groups(K_q, fmt.group_size)
    if clip is not None and clip.shape not in ((N,), (N, G)):
        raise LowbitError(f"clip must be (N,) or (N, G) = ({N}, {G}) ratios, got shape {tuple(clip.shape)}")
    if fmt.dtype == "fp8_e4m3":  # see the module docstring: RTN only
        return rtn_quantize(w[:, remaining], fmt, clip), (w[:, keep].float().clone() if keep.numel() else None)
    if fmt.sparsity == "2:4" and K_q % 4:
        raise LowbitError(f"2:4 sparsity needs a multiple of 4 quantized columns, got {K_q}")
    if block_size < 1:
        raise LowbitError(f"block_size must be positive, got {block_size}")
    if fmt.sparsity == "2:4":
        block_size = max(4, block_size - block_size % 4)

    W = w.detach().float().clone()
    H = H.detach().to(device=device, dtype=HESSIAN_DTYPE).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # processing order: the quantized columns (by decreasing diag(H) with act_order), then the kept ones
    order = remaining  # position -> original column
    if fmt.act_order:
        order = remaining[torch.argsort(H.diagonal()[remaining], descending=True, stable=True)]
    perm = torch.cat([order, keep])
    # rank of each processing position among the remaining columns (= its index in the result)
    rank = torch.empty(K, dtype=torch.long, device=device)
    rank[remaining] = torch.arange(K_q, device=device)
    order_rank = rank[order]

    U = _inverse_hessian_cholesky(H[perm][:, perm], damp, name)
    if U is None:
        return _fallback(W, fmt, clip, remaining, keep)

    gs = fmt.group_size
    g_idx = None
    if gs is None or (fmt.act_order and fmt.static_groups):
        # scales fixed up-front on the original weights, groups in natural order of the remaining columns
        scale, zero = compute_scales(W[:, remaining], fmt, clip)
        pos_group = (order_rank // gs if gs else torch.zeros(K_q, dtype=torch.long)).tolist()
        dynamic = False
    else:
        scale = torch.empty(N, G, dtype=torch.float16, device=device)
        zero = None if fmt.symmetric else torch.empty(N, G, dtype=torch.uint8, device=device)
        pos_group = (torch.arange(K_q) // gs).tolist()
        dynamic = True
        if fmt.act_order:  # groups follow the processing order: g_idx maps each result column to its group
            g_idx = torch.empty(K_q, dtype=torch.long, device=device)
            g_idx[order_rank] = torch.arange(K_q, device=device) // gs

    Wp = W[:, perm].contiguous()
    codes_p = _gptq_blocks(Wp, U, K_q, fmt, pos_group, scale, zero, dynamic, block_size, clip)
    codes = torch.empty_like(codes_p)
    codes[:, order_rank] = codes_p
    kept = Wp[:, K_q:].clone() if keep.numel() else None
    return QuantizedWeight(fmt, codes, scale, zero, g_idx), kept
