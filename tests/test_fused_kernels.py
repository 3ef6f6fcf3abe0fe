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
@pytest.mark.parametrize("with_smooth", [False, True])
# one program per row (N <= 1024 or more than 64 rows) and the chunked two-kernel path (few long rows,
# last chunk partial)
@pytest.mark.parametrize("M, N", [(1, 96), (3, 1500), (1, 2500), (17, 33), (65, 1100)])
def test_silu_mul_quantizes_for_the_next_gemm(act_dtype, with_smooth, M, N):
    from lowbit.kernels.activations import ActQuantSpec

    gu = _rand(M, 2 * N)
    gate, up = gu[:, :N], gu[:, N:]
    smooth = (torch.rand(N, generator=torch.Generator().manual_seed(5)) + 0.5).to(DEVICE) if with_smooth else None
    spec = ActQuantSpec(act_dtype, smooth)
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
@pytest.mark.parametrize("B, hq, hkv", [(1, 4, 2), (3, 6, 3), (17, 2, 1)])
def test_rope_store_matches_reference(dtype, B, hq, hkv):
    hd, slots, L = 32, 20, 9
    qkv = _rand(B, 1, (hq + 2 * hkv) * hd, dtype=dtype)  # views of a fused QKV output, as in decode
    q = qkv[..., : hq * hd].view(B, 1, hq, hd)
    k = qkv[..., hq * hd: (hq + hkv) * hd].view(B, 1, hkv, hd)
    v = qkv[..., (hq + hkv) * hd:].view(B, 1, hkv, hd)
    ang = torch.rand(B, 1, hd // 2, generator=torch.Generator().manual_seed(4)) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(DEVICE, dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(DEVICE, dtype)
    g = torch.Generator().manual_seed(5)
    slot = torch.randperm(slots, generator=g)[:B].to(DEVICE, torch.int32)  # distinct slots, in any order
    pos = torch.randint(0, L, (B,), generator=g).to(DEVICE)
    keys, values = _rand(slots, hkv, L, hd, dtype=dtype, seed=6), _rand(slots, hkv, L, hd, dtype=dtype, seed=7)
    ref_k, ref_v = keys.clone(), values.clone()
    out = fused.rope_store(q, k, v, cos, sin, keys, values, slot, pos)
    ref = fused.rope_store_reference(q, k, v, cos, sin, ref_k, ref_v, slot, pos)
    assert out.shape == (B, hq, hd) and out.is_contiguous()
    tol = {} if DEVICE == "cpu" else {"rtol": 1e-2, "atol": 1e-2}  # as test_rope_matches_reference
    if DEVICE == "cpu":
        assert torch.equal(out, ref) and torch.equal(keys, ref_k) and torch.equal(values, ref_v)
    else:
        torch.testing.assert_close(out, ref, **tol)
        torch.testing.assert_close(keys, ref_k, **tol)
        assert torch.equal(values, ref_v)  # values are copied, never rounded
    written = torch.zeros(slots, L, dtype=torch.bool)
    written[slot.long().cpu(), pos.long().cpu()] = True
    before = _rand(slots, hkv, L, hd, dtype=dtype, seed=6).cpu().transpose(1, 2)  # (slots, L, hkv, hd)
    assert torch.equal(keys.cpu().transpose(1, 2)[~written], before[~written]), \
        "slots and positions not written must be left alone"


def test_rope_store_errors():
    q, k = _rand(2, 1, 4, 32), _rand(2, 1, 2, 32)
    cos = _rand(2, 1, 32)
    cache = _rand(3, 2, 5, 32)
    idx = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(LowbitError, match="one token per row"):
        fused.rope_store(_rand(2, 2, 4, 32), k, k, cos, cos, cache, cache, idx, idx)
    with pytest.raises(LowbitError, match="contiguous"):
        fused.rope_store(q, k, k, cos, cos, _rand(3, 4, 5, 32), _rand(3, 4, 5, 32), idx, idx)


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


def test_pdl_is_off_where_it_cannot_run(monkeypatch):
    """Programmatic dependent launch needs sm_90 and a compiled kernel: never on the CPU or in the
    interpreter, and LOWBIT_PDL=0 turns it off."""
    from lowbit.kernels import pdl

    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.enabled(torch.device("cuda", 0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("LOWBIT_PDL", "0")
    assert not pdl.enabled(torch.device("cuda", 0))
