"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, one factor per input channel.

Activations of LLMs have a few input channels whose magnitude is 10-100x the others; with one scale
per token those channels eat the whole int8 range. SmoothQuant divides each input channel j of the
activation by ``s_j`` and multiplies the matching weight column by ``s_j``. The float function is
unchanged, because for x (T, K), W (N, K) and s (K,)::

    (x / s) @ (W * s)^T == x @ W^T          # sum_j (x_tj / s_j) (W_nj s_j) = sum_j x_tj W_nj

so only the quantization error moves: activations get flatter, weights (quantized per output channel,
which absorbs a column scale well) take up the difference. The division by ``s`` costs nothing at
run time when it is folded into the preceding RMSNorm's gain (``fold_into_norm``).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, WeightFormat
from lowbit.numerics.primitives import fake_quantize_activation, fake_quantize_weight

DEFAULT_ALPHAS: tuple[float, ...] = tuple(i / 10 for i in range(11))  # 0.0, 0.1, ..., 1.0
PREFERRED_ALPHA = 0.5  # SmoothQuant's default: wins ties in the search
RTOL = 1e-3  # errors within this fraction of the best are ties
_MIN = 1e-5  # SmoothQuant's clamp on weight magnitudes and on the factors


def smooth_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing factors ``s`` (K,) fp32.

    ``act_absmax`` (K,): max |x_j| over calibration tokens; ``weight_absmax`` (K,): max |W_nj| over
    the output rows of every Linear that reads these activations. SmoothQuant eq. (4):
    ``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``; ``alpha`` is the migration strength: at 1,
    ``s_j = max|X_j|`` and every smoothed activation channel has absmax 1 (all difficulty on the
    weights); at 0, ``s_j = 1 / max|W_j|`` flattens the weight columns instead (this is *not* "no
    smoothing", which is ``s = 1``); the paper uses 0.5 for most models.

    Guards: weight magnitudes and ``s`` are clamped to >= 1e-5 (as in the reference code), and a
    channel whose activation is never non-zero gets ``s = 1`` (nothing to migrate; 0**alpha would
    otherwise zero the weight column's scale).
    """
    if act_absmax.shape != weight_absmax.shape or act_absmax.ndim != 1:
        raise LowbitError(
            "smoothing needs two (K,) magnitude vectors, "
            f"got {tuple(act_absmax.shape)} and {tuple(weight_absmax.shape)}"
        )
    # in float64, rounded once to fp32: pow is not correctly rounded, and CPU and CUDA differ in the
    # last fp32 bit of it; one rounding of a float64 result almost always gives the same fp32 value
    a = act_absmax.double().abs()
    w = weight_absmax.double().abs().clamp(min=_MIN)
    s = (a.clamp(min=_MIN).pow(alpha) / w.pow(1.0 - alpha)).clamp(min=_MIN)
    return torch.where(a > 0, s, torch.ones_like(s)).float()


def _weight_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """(K,) fp32: max |W_nj| over the rows of all ``weights`` (each (N_i, K)) concatenated."""
    return torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def smoothing_error(
    x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, wfmt: WeightFormat, afmt: ActivationFormat
) -> float:
    """The search's objective for factors ``s`` (K,): the mean over tokens of the relative output error

        e_t = sum_i || y_it - fakeQ_a(x_t / s) @ fakeQ_w(W_i * s)^T ||^2 / sum_i || y_it ||^2,  y_it = x_t @ W_i^T

    ``x`` (T, K), ``weights`` (N_i, K). Tokens whose float outputs are all zero are left out. The
    fake-quantized operands are computed in fp32 (the numerics the layer will run with), the products
    and sums in float64.

    Each token counts once, whatever its scale: LLMs have a few tokens (the first of a window, the
    "attention sink") whose activations entering down_proj are 1000x the others' (2927 against a
    median of 1.6 on SmolLM2-135M's layer 11), and in a plain sum of squared errors those few tokens
    are the whole objective. The next RMSNorm divides each token by its own scale, so what reaches
    the rest of the model is each token's relative error.
    """
    x = x.float()
    s = s.float().to(x.device)
    xs = fake_quantize_activation(x / s, afmt).double()
    x64 = x.double()
    num = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    den = torch.zeros_like(num)
    for w in weights:
        w = w.float().to(x.device)
        ref = x64 @ w.double().T
        num += ((ref - xs @ fake_quantize_weight(w * s, wfmt).double().T) ** 2).sum(dim=1)
        den += (ref**2).sum(dim=1)
    live = den > 0
    if not bool(live.any()):
        return 0.0
    return float((num[live] / den[live]).mean())


def _pick(candidates: list[float], errors: list[float], preferred: float) -> int:
    """Index of the candidate closest to ``preferred`` (then the smaller) among those whose error is
    within ``RTOL`` of the smallest."""
    best = min(errors)
    tied = [i for i, e in enumerate(errors) if e <= best + RTOL * abs(best)]
    return min(tied, key=lambda i: (abs(candidates[i] - preferred), candidates[i]))


def search_smooth_alpha(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    wfmt: WeightFormat,
    afmt: ActivationFormat,
    alphas: tuple[float, ...] | list[float] = DEFAULT_ALPHAS,
) -> tuple[float, torch.Tensor]:
    """Grid-search the migration strength ``alpha`` for one group of Linears sharing an input.

    ``x`` (T, K): calibration activations feeding the Linears; ``weights``: their weights (N_i, K)
    (e.g. q/k/v_proj, or gate/up_proj). For each alpha, ``s = smooth_factors(absmax_T |x|,
    max over all rows |W|, alpha)`` and the output error ``smoothing_error(x, weights, s, ...)`` (the
    mean per-token relative error) is measured with round-to-nearest weights (``fake_quantize_weight``,
    whatever ``wfmt.method``) and dynamic per-token activations (``fake_quantize_activation`` with
    ``afmt``; FMPQ blocks, if any, all at ``afmt.bits``; QUIK outlier columns are not split off here).
    Returns the alpha with the smallest error and its ``s`` (K,) fp32; alphas whose errors are within
    ``RTOL`` of the smallest are ties, won by the one closest to ``PREFERRED_ALPHA`` (0.5), so that a
    perturbation of the inputs which moves no error across that margin picks the same alpha.

    SmoothQuant (their per-model alpha sweep) and OdysseyLLM (W4A8, alpha searched per layer) pick
    alpha this way; the searched alpha adapts to each layer's outlier severity and to the weight
    bit width (4-bit weights tolerate less migration than 8-bit ones).
    """
    if x.ndim != 2 or not weights or any(w.ndim != 2 or w.shape[1] != x.shape[1] for w in weights):
        raise LowbitError(
            f"search_smooth_alpha needs x (T, K) and weights (N, K) with the same K, got x {tuple(x.shape)} "
            f"and weights {[tuple(w.shape) for w in weights]}"
        )
    if not alphas:
        raise LowbitError("search_smooth_alpha needs at least one alpha")
    x = x.float()
    ws = [w.float().to(x.device) for w in weights]
    act_absmax = x.abs().amax(dim=0)
    w_absmax = _weight_absmax(ws)
    cands = [float(a) for a in alphas]
    factors = [smooth_factors(act_absmax, w_absmax, a) for a in cands]
    errors = [smoothing_error(x, ws, s, wfmt, afmt) for s in factors]
    i = _pick(cands, errors, PREFERRED_ALPHA)
    return cands[i], factors[i]


def fold_into_norm(
    norm_weight: torch.Tensor, linears_weights: list[torch.Tensor], s: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fold smoothing factors ``s`` (K,) into an RMSNorm gain (K,) and the Linears (N, K) reading it.

    ``RMSNorm(x) = x_hat * g`` feeds ``y = RMSNorm(x) @ W^T``; with ``g' = g / s`` and ``W' = W * s``
    (column j scaled by s_j), ``x_hat * g' @ W'^T == x_hat * g @ W^T`` (the identity in the module
    docstring), and the norm's output ``x_hat * g'`` is already the smoothed activation. Requires a
    norm of the form ``x_hat * g`` (not Gemma's ``x_hat * (1 + g)``). Out of place: returns new
    tensors ``(g / s, [W * s, ...])``, computed in fp32 and cast back to each input's dtype.
    """
    K = norm_weight.shape[-1]
    if norm_weight.ndim != 1 or s.shape != (K,) or any(w.ndim != 2 or w.shape[1] != K for w in linears_weights):
        raise LowbitError(
            f"fold_into_norm needs a (K,) norm gain, (K,) factors and (N, K) weights, got {tuple(norm_weight.shape)}, "
            f"{tuple(s.shape)} and {[tuple(w.shape) for w in linears_weights]}"
        )
    s = s.float()
    g = (norm_weight.float() / s.to(norm_weight.device)).to(norm_weight.dtype)
    return g, [(w.float() * s.to(w.device)).to(w.dtype) for w in linears_weights]
