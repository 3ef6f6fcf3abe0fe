"""Fused decoder kernels (residual add + RMSNorm, rotary, SiLU-gate) against their PyTorch references,
in the Triton interpreter on CPU and compiled on a GPU; odd sizes, strided views, error paths."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError

pytest.importorskip("triton")
from lowbit.kernels import fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # NumPy has no bf16


def _rand(*shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 1, 96), (17, 200)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm_matches_reference(dtype, shape, with_residual):
    x = _rand(*shape, dtype=dtype)
    r = _rand(*shape, dtype=dtype, seed=1) if with_residual else None
    w = _rand(shape[-1], dtype=dtype, seed=2)
    out, h = fused.add_rmsnorm(x, r, w, 1e-5)
    ref_out, ref_h = fused.add_rmsnorm_reference(x, r, w, 1e-5)
    assert torch.equal(h, ref_h)  # the residual add is exact
    # the normalized values may differ by one rounding step (the fp32 sum's order)
    torch.testing.assert_close(out, ref_out, rtol=8e-3, atol=1e-2)


ACT_DTYPES = ["int"] + (["fp8_e4m3"] if DEVICE == "cuda" else [])  # NumPy has no fp8


def _codes_equal(got, x, spec):
    """``got`` (QuantizedActivations) equals quantize_activations on ``x`` (the unfused kernel's output)."""
    from lowbit.kernels.act_quant import quantize_activations

    q, s = quantize_activations(x.reshape(-1, x.shape[-1]), spec.dtype, spec.smooth)
    assert got.q.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(got.q.view(torch.uint8).reshape(q.shape), q.view(torch.uint8)) and torch.equal(got.scale, s)


@pytest.mark.parametrize("act_dtype", ACT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 1, 96), (17, 200)])
@pytest.mark.parametrize("with_smooth", [False, True])
def test_add_rmsnorm_quantizes_for_the_next_gemm(act_dtype, shape, with_smooth):
    from lowbit.kernels.activations import ActQuantSpec

    x, r, w = _rand(*shape), _rand(*shape, seed=1), _rand(shape[-1], seed=2)
    smooth = (torch.rand(shape[-1], generator=torch.Generator().manual_seed(4)) + 0.5).to(DEVICE)
    spec = ActQuantSpec(act_dtype, smooth if with_smooth else None)
    got, h = fused.add_rmsnorm(x, r, w, 1e-5, spec)
    out, h_ref = fused.add_rmsnorm(x, r, w, 1e-5)
    assert torch.equal(h, h_ref)
    _codes_equal(got, out, spec)


@pytest.mark.parametrize("act_dtype", ACT_DTYPES)
@pytest.mark.parametrize("M, N", [(1, 96), (3, 1500), (17, 33)])
def test_silu_mul_quantizes_for_the_next_gemm(act_dtype, M, N):
    from lowbit.kernels.activations import ActQuantSpec

    gu = _rand(M, 2 * N)
    gate, up = gu[:, :N], gu[:, N:]
    spec = ActQuantSpec(act_dtype, (torch.rand(N, generator=torch.Generator().manual_seed(5)) + 0.5).to(DEVICE))
    _codes_equal(fused.silu_mul(gate, up, spec), fused.silu_mul(gate, up), spec)


def test_fused_quantization_errors():
    from lowbit.kernels.activations import ActQuantSpec

    x, w = _rand(2, 64), _rand(64, seed=2)
    with pytest.raises(LowbitError, match="smooth must be fp32"):
        fused.add_rmsnorm(x, None, w, 1e-5, ActQuantSpec("int", torch.ones(32, device=DEVICE)))
    with pytest.raises(LowbitError, match="'int' or 'fp8_e4m3'"):
        fused.silu_mul(x, x, ActQuantSpec("int4"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, heads", [(1, 1, 4), (3, 5, 2), (2, 17, 3)])
def test_rope_matches_reference(dtype, B, T, heads):
    hd = 32
    qkv = _rand(B, T, (heads + 2) * hd, dtype=dtype)  # a fused projection output: q is a strided view
    q = qkv[..., : heads * hd].view(B, T, heads, hd)
    ang = torch.rand(B, T, hd // 2, generator=torch.Generator().manual_seed(3)) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(DEVICE, dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(DEVICE, dtype)
    out = fused.rope(q, cos, sin)
    assert out.is_contiguous() and out.shape == q.shape
    ref = fused.rope_reference(q, cos, sin)
    if DEVICE == "cpu":
        assert torch.equal(out, ref)  # the interpreter rounds exactly as PyTorch's three ops
    else:
        # compiled, a product may round one step apart (seen on the H100); with cancellation in the sum
        # that is up to ~1e-3 absolute at |values| ~ 2
        torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N", [(1, 96), (3, 1500), (17, 33)])
def test_silu_mul_matches_reference(dtype, M, N):
    gu = _rand(M, 2 * N, dtype=dtype)
    gate, up = gu[:, :N], gu[:, N:]  # views of a fused gate-up output
    out = fused.silu_mul(gate, up)
    torch.testing.assert_close(out, fused.silu_mul_reference(gate, up), rtol=4e-3, atol=4e-3)


def test_errors():
    x = _rand(2, 8)
    with pytest.raises(LowbitError, match="must agree"):
        fused.add_rmsnorm(x, None, _rand(9), 1e-5)
    with pytest.raises(LowbitError, match="unit last stride"):
        fused.silu_mul(x, _rand(2, 9))
    with pytest.raises(LowbitError, match="cos/sin"):
        fused.rope(_rand(1, 2, 3, 8), _rand(1, 2, 4), _rand(1, 2, 4))
