"""Each step of the calibration recipe against a float64 reference written out here in plain PyTorch.

The recipe (SmoothQuant alpha search, clipping search, GPTQ) makes discrete choices; a choice that a
rounding difference can flip makes the quantized model depend on the device (CPU BLAS and cuBLAS sum
in different orders). These tests pin the numbers each step computes (Hessian accumulation, the
dampened inverse, the clipping and smoothing objectives) to their float64 values, and check that
perturbing the inputs by ~1e-6 relative, about what a different reduction order does, leaves every
choice as it was, on data built to have ties and near-ties (where an exact argmin flips).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lowbit.formats import ActivationFormat, WeightFormat
from lowbit.numerics.primitives import fake_quantize_activation, fake_quantize_weight
from lowbit.quant import clip, gptq, smooth
from lowbit.quant.calibrate import _GroupStats

W4 = WeightFormat(group_size=None, clip_search=True)  # the w4a8 preset's weights
A8 = ActivationFormat(bits=8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _acts(g: torch.Generator, T: int, K: int) -> torch.Tensor:
    """(T, K) correlated activations with a few outlier channels and one 1000x "attention sink" token."""
    x = torch.randn(T, K, generator=g) @ (torch.randn(K, K, generator=g) / K**0.5) + 0.3 * torch.randn(T, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:3]] *= 20.0
    x[0] *= 1000.0
    return x


def _hessian64(x: torch.Tensor) -> torch.Tensor:
    x = x.double().reshape(-1, x.shape[-1])
    return 2.0 * x.T @ x / x.shape[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _jitter(t: torch.Tensor, g: torch.Generator, rel: float = 1e-6) -> torch.Tensor:
    return t * (1 + rel * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype)


# --- Hessian accumulation --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hessian_accumulation_is_float64_exact_whatever_the_chunking(dtype):
    g = _gen(1)
    K = 37
    x = (_acts(g, 1501, K) / 50).to(dtype)  # fp16 range; the sink token is 20x the others here
    ref = _hessian64(x)  # x of any float dtype is exact in float64
    results = []
    for sizes in ([1501], [1, 250, 333, 917], [700, 1, 800]):
        H, n = gptq.make_empty_hessian(K), 0
        for c in x.split(sizes):
            H, n = gptq.accumulate_hessian(H, c, n)
        assert n == 1501 and H.dtype == torch.float64
        # fp32 accumulation is ~1e-7 off here (and grows with the token count): this pins float64
        assert _rel(H, ref) < 1e-13
        results.append(H)
    assert _rel(results[1], results[0]) < 1e-13 and _rel(results[2], results[0]) < 1e-13
    H, _ = gptq.accumulate_hessian(gptq.make_empty_hessian(K), x.reshape(19, 79, K), 0)  # (..., K) inputs
    assert _rel(H, ref) < 1e-13


def test_group_stats_and_their_smoothing_rescale_match_float64():
    g = _gen(2)
    K = 29
    x = _acts(g, 3 * 211, K).reshape(3, 211, K)
    st = _GroupStats(K, torch.device("cpu"), keep_tokens=100)
    for b in x:
        st.add(b[None], "layers.0.test")
    assert st.H.dtype == torch.float64 and st.n == 633
    assert _rel(st.H, _hessian64(x)) < 1e-13
    torch.testing.assert_close(st.absmax, x.abs().amax(dim=(0, 1)), rtol=0, atol=0)
    s = torch.rand(K, generator=g) * 4 + 0.25
    st.rescale(s)
    # the statistics of x / s, with x / s taken in float64 (st.H / (s s^T) is exact up to float64 rounding)
    assert _rel(st.H, _hessian64(x.double() / s.double())) < 1e-13


# --- dampening and the inverse Hessian factor ------------------------------------------------------


def _ill_conditioned(g: torch.Generator, K: int) -> torch.Tensor:
    """H = Q diag(lam) Q^T with one dominant direction: cond(H + 0.01 mean(diag) I) ~ 1e4, as real o_proj inputs."""
    Q, _ = torch.linalg.qr(torch.randn(K, K, generator=g, dtype=torch.float64))
    lam = torch.logspace(-6, 0, K, dtype=torch.float64)
    lam[-1] = float(K)
    return (Q * lam) @ Q.T


def _u_ref(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.double()
    Hd = H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)


def test_dampened_inverse_factor_matches_float64():
    g = _gen(3)
    K = 151
    H = _ill_conditioned(g, K)
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(K, dtype=torch.float64)
    cond = float(torch.linalg.cond(Hd))
    assert cond > 5e3, cond  # the test needs the amplification that made fp32 lose ~1e-3 on real layers
    ref = _u_ref(H, 0.01)
    U = gptq._inverse_hessian_cholesky(H, 0.01, "t")
    assert U.dtype == torch.float32
    assert _rel(U, ref) < 2e-7  # fp32 rounding of the float64 factor; computed in fp32: ~1e-4 here
    U32 = gptq._inverse_hessian_cholesky(H.float(), 0.01, "t")  # an fp32 Hessian is factorized in float64 too
    assert _rel(U32, _u_ref(H.float(), 0.01)) < 2e-7
    torch.testing.assert_close(U.double().T @ U.double() @ Hd, torch.eye(K, dtype=torch.float64), rtol=0, atol=1e-4)


def test_dampening_retries_multiply_by_ten_and_match_float64():
    g = _gen(4)
    K = 40
    x = torch.randn(300, K, generator=g, dtype=torch.float64)
    H = _hessian64(x)
    # channel 0 on its own with H_00 = -0.03 mean(diag H): indefinite with damp 0.01, definite with 0.1
    H[0, 1:], H[1:, 0] = 0.0, 0.0
    rest = float(H.diagonal()[1:].sum())
    H[0, 0] = -0.03 * rest / K / (1 + 0.03 / K)
    assert abs(float(H[0, 0] / H.diagonal().mean()) + 0.03) < 1e-12
    with pytest.warns(RuntimeWarning, match="damp=0.01.*retrying with damp=0.1") as record:
        U = gptq._inverse_hessian_cholesky(H, 0.01, "layers.0.t")
    assert len(record) == 1
    assert _rel(U, _u_ref(H, 0.1)) < 2e-7


# --- clipping search -------------------------------------------------------------------------------


def _clip_errors64(w: torch.Tensor, H: torch.Tensor, grid: list[float]) -> torch.Tensor:
    """(N, R) float64: d^T H d with d = w - RTN(w, clip=r) (RTN in fp32, the spec)."""
    cols = []
    for r in grid:
        d = (w - fake_quantize_weight(w, W4, clip=torch.full((w.shape[0],), r))).double()
        cols.append(((d @ H.double()) * d).sum(1))
    return torch.stack(cols, 1)


def _grid() -> list[float]:
    return sorted(clip._default_ratios().tolist(), reverse=True)


def _clip_ref(w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The documented rule: the largest ratio whose float64 error is within RTOL of the row's best."""
    grid = _grid()
    E = _clip_errors64(w, H, grid)
    best = E.min(1, keepdim=True).values
    ok = E <= best + clip.RTOL * best.abs()
    return torch.tensor([max(r for r, o in zip(grid, row) if o) for row in ok.tolist()])


def _near_tie(g: torch.Generator, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w (K,), H (K, K)) whose two best clipping ratios have equal float64 errors (to ~1e-15).

    Start from a random row and Hessian, then add t to H[j, j] for the column j where the best ratio
    is worse than the runner-up, with t chosen to close the gap; retry until the pair stays the best.
    """
    grid = _grid()
    for _ in range(200):
        w = torch.randn(1, K, generator=g)
        w[0, 0] *= 6  # a heavy tail: clipping helps
        H = _hessian64(torch.randn(4 * K, K, generator=g))
        D = torch.stack([(w - fake_quantize_weight(w, W4, clip=torch.full((1,), r))).double()[0] for r in grid])
        E = ((D @ H) * D).sum(1)
        order = E.argsort()
        a, b = int(order[0]), int(order[1])
        gain = D[a] ** 2 - D[b] ** 2  # raising H[j, j] raises E[a] faster than E[b] where gain > 0
        j = int(gain.argmax())
        if float(gain[j]) <= 0:
            continue
        t = float((E[b] - E[a]) / gain[j])
        H2 = H.clone()
        H2[j, j] += t
        E2 = ((D @ H2) * D).sum(1)
        if int(E2.argmin()) in (a, b) and torch.sort(E2).values[2] > E2[a] * (1 + 10 * clip.RTOL):
            assert abs(float(E2[a] - E2[b])) < 1e-12 * float(E2[a])
            return w[0], H2
    raise AssertionError("no near-tie constructed")


def test_clip_error_and_search_match_the_float64_rule():
    g = _gen(5)
    N, K = 33, 91
    w = torch.randn(N, K, generator=g)
    w[:, :3] *= 5
    x = _acts(g, 400, K)
    H = _hessian64(x)
    E = _clip_errors64(w, H, _grid())
    for i, r in enumerate(_grid()):
        e = clip.clip_error(w, H, W4, torch.full((N,), r))
        assert e.dtype == torch.float32
        torch.testing.assert_close(e.double(), E[:, i], rtol=1e-7, atol=0)  # the float64 value, rounded once
    r = clip.search_clip(w, H, W4)
    assert torch.equal(r, _clip_ref(w, H).float())
    assert torch.equal(clip.search_clip(w, H.float(), W4), r)  # an fp32 copy of H makes the same choices
    assert (r < 1).any()  # the search does clip here
    assert (clip.clip_error(w, H, W4, r) <= clip.clip_error(w, H, W4, None)).all()


def test_clip_choices_survive_a_1e6_perturbation_even_at_ties():
    g = _gen(6)
    K = 48
    rows = [_near_tie(g, K) for _ in range(12)]
    for w, H in rows:
        r = clip.search_clip(w[None], H, W4)
        assert torch.equal(r, _clip_ref(w[None], H).float())
        for _ in range(4):  # a different reduction order: H and w off by ~1e-6 relative
            Hp = _jitter(H, g)
            Hp = (Hp + Hp.T) / 2
            assert torch.equal(clip.search_clip(w[None], Hp, W4), r)
    # and on ordinary data: every row of a layer keeps its ratio
    N = 64
    w = torch.randn(N, K, generator=g)
    H = _hessian64(_acts(g, 300, K))
    r = clip.search_clip(w, H, W4)
    for _ in range(3):
        assert torch.equal(clip.search_clip(w, _jitter(H, g), W4), r)


# --- smoothing search ------------------------------------------------------------------------------


def _smooth_error_ref(x: torch.Tensor, ws: list[torch.Tensor], s: torch.Tensor, wfmt=W4, afmt=A8) -> float:
    """Mean over tokens of sum_i ||y_i - yhat_i||^2 / sum_i ||y_i||^2, fake-quantized operands in fp32,
    everything else in float64."""
    xq = fake_quantize_activation(x / s, afmt).double()
    num = torch.zeros(x.shape[0], dtype=torch.float64)
    den = torch.zeros_like(num)
    for w in ws:
        y = x.double() @ w.double().T
        num += ((y - xq @ fake_quantize_weight(w * s, wfmt).double().T) ** 2).sum(1)
        den += (y**2).sum(1)
    keep = den > 0
    return float((num[keep] / den[keep]).mean())


def _factors_ref(x: torch.Tensor, ws: list[torch.Tensor], alpha: float) -> torch.Tensor:
    a = x.double().abs().amax(0)
    wm = torch.cat(ws).double().abs().amax(0).clamp(min=1e-5)
    s = (a.clamp(min=1e-5) ** alpha / wm ** (1 - alpha)).clamp(min=1e-5)
    return torch.where(a > 0, s, torch.ones_like(s)).float()


def _alpha_ref(x: torch.Tensor, ws: list[torch.Tensor], wfmt=W4, afmt=A8) -> float:
    alphas = list(smooth.DEFAULT_ALPHAS)
    errs = [_smooth_error_ref(x, ws, _factors_ref(x, ws, a), wfmt, afmt) for a in alphas]
    best = min(errs)
    tied = [a for a, e in zip(alphas, errs) if e <= best + smooth.RTOL * abs(best)]
    return min(tied, key=lambda a: (abs(a - 0.5), a))


def test_smoothing_factors_and_objective_match_float64():
    g = _gen(7)
    T, K = 203, 77
    x = _acts(g, T, K)
    x[:, 5] = 0.0  # a dead channel: s = 1
    ws = [torch.randn(45, K, generator=g) * 0.05, torch.randn(19, K, generator=g) * 0.05]
    for alpha in smooth.DEFAULT_ALPHAS:
        s = smooth.smooth_factors(x.abs().amax(0), torch.cat(ws).abs().amax(0), alpha)
        assert s.dtype == torch.float32 and float(s[5]) == 1.0
        assert torch.equal(s, _factors_ref(x, ws, alpha))  # float64, rounded once
        e = smooth.smoothing_error(x, ws, s, W4, A8)
        assert abs(e - _smooth_error_ref(x, ws, s)) <= 1e-12 * _smooth_error_ref(x, ws, s)
    alpha, s = smooth.search_smooth_alpha(x, ws, W4, A8)
    assert alpha == _alpha_ref(x, ws)
    assert torch.equal(s, _factors_ref(x, ws, alpha))
    # 8-bit weights: the objective is ~100x smaller, still exact
    w8 = WeightFormat(bits=8, group_size=None, method="rtn")
    assert smooth.search_smooth_alpha(x, ws, w8, A8)[0] == _alpha_ref(x, ws, w8)


def test_smoothing_objective_counts_every_token_once():
    """A token scaled by 1024 (exactly: per-token quantization is scale-free at powers of two) keeps
    its share of the objective; in a plain sum of squared errors it would be all of it."""
    g = _gen(8)
    T, K = 150, 64
    x = _acts(g, T, K)
    x[0] /= 1000.0  # no sink to begin with
    ws = [torch.randn(32, K, generator=g) * 0.05]
    s = _factors_ref(x, ws, 0.5)
    e = smooth.smoothing_error(x, ws, s, W4, A8)
    loud = x.clone()
    loud[7] *= 1024.0
    assert abs(smooth.smoothing_error(loud, ws, s, W4, A8) - e) <= 1e-12 * e
    silent = torch.cat([x, torch.zeros(5, K)])  # tokens with zero output do not count
    assert abs(smooth.smoothing_error(silent, ws, s, W4, A8) - e) <= 1e-12 * e


def test_smoothing_choice_survives_a_1e6_perturbation_even_at_ties():
    g = _gen(9)
    T, K = 128, 64
    # every alpha gives s = 1: channel absmax of x and of W exactly 1, so all errors tie exactly;
    # the tie goes to 0.5, and a 1e-6 jitter (which an exact argmin would follow) changes nothing
    x = _acts(g, T, K)
    x = x / x.abs().amax(0)
    w = torch.randn(40, K, generator=g)
    w = w / w.abs().amax(0)
    assert torch.equal(x.abs().amax(0), torch.ones(K)) and torch.equal(w.abs().amax(0), torch.ones(K))
    assert smooth.search_smooth_alpha(x, [w], W4, A8)[0] == 0.5
    errs = [smooth.smoothing_error(x, [w], smooth.smooth_factors(x.abs().amax(0), w.abs().amax(0), a), W4, A8)
            for a in smooth.DEFAULT_ALPHAS]
    assert max(errs) == min(errs)
    for _ in range(5):
        xp, wp = _jitter(x, g), _jitter(w, g)
        alpha, s = smooth.search_smooth_alpha(xp, [wp], W4, A8)
        assert alpha == 0.5
        assert _rel(s, torch.ones(K)) < 1e-5
    # ordinary data with a sink token: the searched alpha is a clear winner and stays put
    x = _acts(g, 257, K)
    ws = [torch.randn(48, K, generator=g) * 0.05, torch.randn(24, K, generator=g) * 0.05]
    alpha, s = smooth.search_smooth_alpha(x, ws, W4, A8)
    for _ in range(3):
        a2, s2 = smooth.search_smooth_alpha(_jitter(x, g), [_jitter(w, g) for w in ws], W4, A8)
        assert a2 == alpha and _rel(s2, s) < 1e-5


def test_gptq_factorizes_in_float64_whatever_the_hessian_dtype():
    """A Hessian whose entries are exact in fp32 gives the same GPTQ result passed as fp32 or float64
    (the dampened inverse is taken in float64 either way), without dampening retries."""
    g = _gen(10)
    K, N = 96, 24
    x = torch.randint(-8, 8, (256, K), generator=g).float()  # small integers: 2 x^T x / 256 is exact in fp32
    H = _hessian64(x)
    assert torch.equal(H.float().double(), H)
    w = torch.randn(N, K, generator=g)
    fmt = WeightFormat(group_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, _ = gptq.gptq_quantize(w, H, fmt)
        b, _ = gptq.gptq_quantize(w, H.float(), fmt)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
