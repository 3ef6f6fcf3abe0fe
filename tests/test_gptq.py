"""GPTQ / SparseGPT on small synthetic layers: beats RTN on the output error, codes on the primitives' grid."""

from __future__ import annotations

import warnings
from dataclasses import replace
from functools import lru_cache

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import WeightFormat
from lowbit.quant.gptq import (
    accumulate_hessian,
    gptq_quantize,
    layer_output_error,
    make_empty_hessian,
    rtn_quantize,
)
from lowbit.numerics.primitives import int_range, num_groups, quantize_weight
from lowbit.numerics.quantized import QuantizedWeight
from lowbit.quant.sparse import is_2of4, select_n_of_m

N, TOKENS = 64, 2000
HIGH_VAR = (3, 50, 77, 120)  # input channels with 10x the variance of the others


@lru_cache(maxsize=None)
def _layer(K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (N, K) and the Hessian of correlated inputs x = z A + noise, a few channels 10x louder."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(TOKENS, K, generator=g)
    A = torch.randn(K, K, generator=g) / K**0.5
    x = z @ A + 0.3 * torch.randn(TOKENS, K, generator=g)
    x[:, [c for c in HIGH_VAR if c < K]] *= 10
    H, n = accumulate_hessian(make_empty_hessian(K, "cpu"), x, 0)
    assert n == TOKENS
    return torch.randn(N, K, generator=g), H


def _rtn_format(fmt: WeightFormat) -> WeightFormat:
    return replace(fmt, method="rtn", act_order=False, static_groups=False, sparsity=None)


def _assert_on_grid(qw: QuantizedWeight) -> None:
    """Re-quantizing the dequantized weights with their own scales gives back the codes, bit for bit."""
    requant = quantize_weight(qw.dequantize(), qw.scale, qw.zero, qw.fmt, qw.g_idx)
    assert torch.equal(requant, qw.codes)
    lo, hi = int_range(qw.fmt.bits, qw.fmt.symmetric)
    assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
    assert qw.scale.dtype == torch.float16 and qw.scale.shape == (qw.shape[0], num_groups(qw.shape[1], qw.fmt.group_size))
    if qw.fmt.symmetric:
        assert qw.zero is None and qw.codes.dtype == torch.int8
    else:
        assert qw.zero.shape == qw.scale.shape and qw.codes.dtype == torch.uint8


def test_accumulate_hessian_is_chunking_independent():
    torch.manual_seed(0)
    x = torch.randn(3, 700, 48)  # (..., K): batches of sequences
    flat = x.reshape(-1, 48).double()
    expected = 2 * flat.T @ flat / flat.shape[0]
    for chunks in ([x], list(x.unbind(0)), list(x.reshape(-1, 48).split(333)), [x[:, :1], x[:, 1:]]):
        H, n = make_empty_hessian(48, "cpu"), 0
        for c in chunks:
            H, n = accumulate_hessian(H, c, n)
        assert n == 2100 and H.dtype == torch.float64  # accumulated in float64 (tests/test_recipe_numerics.py)
        torch.testing.assert_close(H, expected, rtol=1e-12, atol=1e-12)
    H, n = accumulate_hessian(make_empty_hessian(48, "cpu"), x[0].half(), 0)  # any float dtype
    assert n == 700
    with pytest.raises(LowbitError, match="channels"):
        accumulate_hessian(H, torch.randn(4, 47), n)


CASES = {
    "int4-per-channel": (128, WeightFormat(group_size=None)),
    "int4-g32": (128, WeightFormat(group_size=32)),
    "int4-g64-K200-partial": (200, WeightFormat(group_size=64)),
    "int4-g32-asym": (128, WeightFormat(group_size=32, symmetric=False)),
    "int4-g64-actorder-static": (256, WeightFormat(group_size=64, act_order=True, static_groups=True)),
    "int4-g64-actorder": (256, WeightFormat(group_size=64, act_order=True)),
    "int8-per-channel": (128, WeightFormat(bits=8, group_size=None)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gptq_beats_rtn_and_codes_are_on_grid(case):
    K, fmt = CASES[case]
    w, H = _layer(K)
    qw, kept = gptq_quantize(w, H, fmt)
    assert kept is None and qw.shape == (N, K)
    _assert_on_grid(qw)
    ratio = layer_output_error(w, qw.dequantize(), H) / layer_output_error(w, rtn_quantize(w, _rtn_format(fmt)).dequantize(), H)
    assert ratio < 0.8, f"{case}: GPTQ / RTN output error {ratio:.3f}"
    if fmt.act_order and not fmt.static_groups:
        assert qw.g_idx is not None and qw.g_idx.shape == (K,) and qw.g_idx.dtype == torch.long
        assert int(qw.g_idx.min()) == 0 and int(qw.g_idx.max()) == num_groups(K, fmt.group_size) - 1
        # groups are consecutive runs of the processing order (decreasing diag(H))
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        assert torch.equal(qw.g_idx[perm], torch.arange(K) // fmt.group_size)
        # act-order is GPTQ on the permuted problem: same codes and scales, dequantize() undoes the permutation
        plain, _ = gptq_quantize(w[:, perm], H[perm][:, perm], replace(fmt, act_order=False))
        assert torch.equal(qw.codes[:, perm], plain.codes) and torch.equal(qw.scale, plain.scale)
        assert torch.equal(qw.dequantize()[:, perm], plain.dequantize())
    else:
        assert qw.g_idx is None


def test_static_groups_scales_come_from_the_original_weights():
    K, fmt = CASES["int4-g64-actorder-static"]
    w, H = _layer(K)
    clip = torch.full((N,), 0.9)
    qw, _ = gptq_quantize(w, H, fmt, clip=clip)
    assert torch.equal(qw.scale, rtn_quantize(w, _rtn_format(fmt), clip).scale)
    _assert_on_grid(qw)


def test_keep_columns_stay_float_and_absorb_the_error():
    K, fmt = 128, WeightFormat(group_size=32)
    w, H = _layer(K)
    keep = torch.tensor(HIGH_VAR[::-1])  # any order: returned in this order
    rest = torch.tensor([c for c in range(K) if c not in HIGH_VAR])
    qw, kept = gptq_quantize(w, H, fmt, keep_columns=keep)
    assert qw.shape == (N, K - len(HIGH_VAR)) and qw.scale.shape == (N, num_groups(K - len(HIGH_VAR), 32))
    _assert_on_grid(qw)
    assert kept.shape == (N, len(HIGH_VAR)) and kept.dtype == torch.float32
    assert not torch.equal(kept, w[:, keep])  # updated by error compensation ...
    assert all(kept[:, j].unique().numel() > 16 for j in range(len(HIGH_VAR)))  # ... and not on a 4-bit grid

    def assemble(kept_cols: torch.Tensor) -> torch.Tensor:
        w_hat = torch.empty_like(w)
        w_hat[:, rest], w_hat[:, keep] = qw.dequantize(), kept_cols
        return w_hat

    with_keep = layer_output_error(w, assemble(kept), H)
    without = layer_output_error(w, gptq_quantize(w, H, fmt)[0].dequantize(), H)
    assert with_keep < 0.8 * without
    assert with_keep < layer_output_error(w, assemble(w[:, keep]), H)  # the compensation helps
    with pytest.raises(LowbitError, match="distinct"):
        gptq_quantize(w, H, fmt, keep_columns=torch.tensor([1, 1]))


def test_select_n_of_m_uses_obs_saliency():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    assert select_n_of_m(w, torch.ones(4)).tolist() == [[True, False, False, True]]
    # a large inverse-Hessian diagonal makes a weight cheap to remove: saliency w^2 / d^2
    assert select_n_of_m(w, torch.tensor([1.0, 1.0, 10.0, 1.0])).tolist() == [[False, False, True, True]]
    assert is_2of4(torch.tensor([[0, 1, 0, 2, 3, 0, 0, 0]])) and not is_2of4(torch.tensor([[1, 1, 0, 2]]))


def test_2of4_sparsegpt_beats_magnitude_pruning_plus_rtn():
    K, fmt = 128, WeightFormat(group_size=32, sparsity="2:4")
    w, H = _layer(K)
    qw, _ = gptq_quantize(w, H, fmt, block_size=30)  # rounded down to a multiple of 4
    _assert_on_grid(qw)
    assert is_2of4(qw.codes)
    zeros = (qw.codes == 0).reshape(N, K // 4, 4).sum(-1)
    assert (zeros >= 2).all() and (zeros == 2).float().mean() > 0.9  # a kept weight may also round to 0
    mask = select_n_of_m(w.reshape(-1, 4), torch.ones(4)).reshape(N, K)
    baseline = rtn_quantize(w.masked_fill(mask, 0.0), _rtn_format(fmt)).dequantize()
    ratio = layer_output_error(w, qw.dequantize(), H) / layer_output_error(w, baseline, H)
    assert ratio < 0.8, f"SparseGPT 2:4 / magnitude+RTN output error {ratio:.3f}"
    for bad in (replace(fmt, symmetric=False), replace(fmt, act_order=True)):
        with pytest.raises(LowbitError, match="2:4"):
            gptq_quantize(w, H, bad)


def test_cholesky_failure_retries_then_falls_back_to_rtn():
    K, fmt = 64, WeightFormat(group_size=32)
    w, _ = _layer(K)
    with pytest.warns(RuntimeWarning, match="Cholesky") as record:
        qw, _ = gptq_quantize(w, -torch.eye(K), fmt)  # negative definite: damping only makes it worse
    messages = [str(r.message) for r in record]
    assert sum("retrying" in m for m in messages) == 3 and "round-to-nearest" in messages[-1]
    assert "of this layer" in messages[-1]  # no name given
    assert torch.equal(qw.codes, rtn_quantize(w, fmt).codes)
    # indefinite by a little: damp 0.01 is not enough, one 10x retry is
    H = torch.eye(K)
    H[5, 5] = -0.05
    with pytest.warns(RuntimeWarning, match="retrying") as record:
        qw, _ = gptq_quantize(w, H, fmt)
    assert len(record) == 1
    _assert_on_grid(qw)


def test_cholesky_warnings_and_errors_name_the_layer():
    K, fmt = 64, WeightFormat(group_size=32)
    w, H = _layer(K)
    name = "layers.3.self_attn.q_proj"
    with pytest.warns(RuntimeWarning) as record:
        qw, _ = gptq_quantize(w, -torch.eye(K), fmt, name=name)
    messages = [str(r.message) for r in record]
    assert all(f"Hessian of {name} failed" in m for m in messages)
    # what to do about it: more, or more varied, calibration data
    assert "falling back to round-to-nearest for this layer" in messages[-1]
    assert "more (or more varied) samples: raise --samples" in messages[-1]
    assert torch.equal(qw.codes, rtn_quantize(w, fmt).codes)
    # rank-deficient inputs (one direction only) are rescued by the dampening: no warning
    x = torch.randn(500, 1) * torch.randn(1, K)
    H1, _ = accumulate_hessian(make_empty_hessian(K), x, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gptq_quantize(w, H1, fmt, name=name)
    bad_H = H.clone()
    bad_H[0, 0] = float("nan")
    with pytest.raises(LowbitError, match=f"Hessian\\) of {name} contain NaN.*--dtype fp32"):
        gptq_quantize(w, bad_H, fmt, name=name)


def test_bad_inputs_dead_columns_and_fp8():
    K, fmt = 64, WeightFormat(group_size=32)
    w, H = _layer(K)
    bad_w, bad_H = w.clone(), H.clone()
    bad_w[3, 7], bad_H[2, 2] = float("nan"), float("inf")
    with pytest.raises(LowbitError, match="weights"):
        gptq_quantize(bad_w, H, fmt)
    with pytest.raises(LowbitError, match="calibration activations"):
        gptq_quantize(w, bad_H, fmt)
    dead = H.clone()
    dead[10, :], dead[:, 10] = 0.0, 0.0  # an input channel that is never active
    qw, _ = gptq_quantize(w, dead, fmt)
    assert (qw.codes[:, 10] == 0).all()
    _assert_on_grid(qw)
    fp8 = WeightFormat(bits=8, dtype="fp8_e4m3", group_size=None, method="rtn")
    qw, _ = gptq_quantize(w.half(), H, fp8)  # RTN only, whatever the input dtype
    assert torch.equal(qw.codes.view(torch.uint8), rtn_quantize(w.half(), fp8).codes.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["int4-g64-actorder", "int4-g32-asym"])
def test_gptq_on_gpu_stays_there_and_matches_cpu(case):
    K, fmt = CASES[case]
    w, H = _layer(K)
    keep = torch.tensor(HIGH_VAR[:2])
    cpu, cpu_kept = gptq_quantize(w, H, fmt, keep_columns=keep, clip=torch.full((N,), 0.95))
    gpu, gpu_kept = gptq_quantize(w.cuda(), H.cuda(), fmt, keep_columns=keep.cuda(), clip=torch.full((N,), 0.95).cuda())
    for t in (gpu.codes, gpu.scale, gpu.g_idx, gpu.zero, gpu_kept):
        assert t is None or t.is_cuda
    _assert_on_grid(gpu)
    # the Cholesky factors differ in the last bits, so a few codes may round the other way
    assert (gpu.codes.cpu() != cpu.codes).float().mean() < 0.02
    torch.testing.assert_close(gpu_kept.cpu(), cpu_kept, rtol=0.02, atol=0.02)
    rest = torch.tensor([c for c in range(K) if c not in HIGH_VAR[:2]])
    errs = [layer_output_error(w[:, rest], q.dequantize().cpu(), H[rest][:, rest]) for q in (cpu, gpu)]
    assert errs[1] == pytest.approx(errs[0], rel=0.05)
