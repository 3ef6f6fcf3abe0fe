"""``kernels.launch.triton_launch``: its specialization key, and on a GPU the same results as the JIT."""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.launch import _spec, cached_specializations, triton_launch, triton

tl = triton.language


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr, NEG: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = alpha * tl.load(x_ptr + offs, mask=ok) + tl.load(y_ptr + offs, mask=ok)
    tl.store(out_ptr + offs, -v if NEG else v, mask=ok)


def test_spec_separates_what_triton_specializes_on():
    base = torch.randn(64)
    assert _spec(base) != _spec(base[1:])  # 16-byte alignment of the address
    assert _spec(base) == _spec(torch.randn(64))
    assert _spec(base) != _spec(base.half())  # pointer type
    assert _spec(1) != _spec(2)  # an int of 1 is a constexpr
    assert _spec(16) != _spec(17)  # divisibility by 16
    assert _spec(17) == _spec(33)
    assert _spec(2**31) != _spec(2**31 - 2**4)  # i64 against i32
    assert _spec(2**63) != _spec(2**62)  # u64 against i64
    assert _spec(0.5) == _spec(3.0)  # a float is a runtime fp32
    assert _spec(True) != _spec(False) and _spec(None) is None


def _axpy(n: int, device: str, alpha: float = 0.5, neg: bool = False, offset: int = 0):
    x = torch.randn(n + offset, device=device)[offset:]
    y = torch.randn(n, device=device)
    out = torch.empty(n, device=device)
    triton_launch(_axpy_kernel, (triton.cdiv(n, 128),), x, y, out, n, alpha, BLOCK=128, NEG=neg)
    expected = alpha * x + y
    return out, -expected if neg else expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where there is no GPU")
def test_launch_in_the_interpreter_matches_the_reference():
    out, expected = _axpy(37, "cpu")
    torch.testing.assert_close(out, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_launches_match_the_jit_for_every_specialization():
    before = cached_specializations(_axpy_kernel)
    for n, alpha, neg, offset in [(1000, 0.5, False, 0), (1000, -2.0, False, 0), (1001, 0.5, True, 0),
                                  (16, 0.25, False, 0), (1, 3.0, True, 0), (999, 0.5, False, 3)]:
        for _ in range(3):  # the first call compiles through the JIT, the next two take the cached launcher
            out, expected = _axpy(n, "cuda", alpha, neg, offset)
            torch.testing.assert_close(out, expected)
    # 1000 and 1000 share one entry (alpha is a runtime float); 1001/True, 16, 1/True, the misaligned x differ
    assert cached_specializations(_axpy_kernel) - before == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_launch_runs_on_the_current_stream():
    s = torch.cuda.Stream()
    _axpy(4096, "cuda")  # compile and cache on the default stream
    with torch.cuda.stream(s):
        out, expected = _axpy(4096, "cuda")
    s.synchronize()
    torch.testing.assert_close(out, expected)


def test_record_without_launching_collects_the_launch_and_runs_nothing():
    from lowbit.kernels.launch import record_launches

    x = torch.randn(37)
    out = torch.full((37,), 7.0)
    with record_launches(launch=False) as rec:
        triton_launch(_axpy_kernel, (1,), x, x, out, 37, 0.5, BLOCK=128, NEG=False)
    assert len(rec) == 1 and rec[0][0] is _axpy_kernel and rec[0][2][3] == 37
    assert torch.equal(out, torch.full((37,), 7.0))  # nothing ran


def test_host_cdiv_and_next_power_of_2_match_tritons():
    from lowbit.kernels.launch import cdiv, next_power_of_2

    for a in range(-5, 300):
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 3, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
