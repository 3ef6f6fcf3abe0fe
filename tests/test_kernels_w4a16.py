"""W4A16 Triton kernel against its reference: odd shapes, both dtypes, zero points, error paths.

Runs in Triton's interpreter on CPU machines (tests/conftest.py sets TRITON_INTERPRET) and on the GPU
where there is one.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import WeightFormat
from lowbit.kernels.reference import w4a16_reference
from lowbit.quant.primitives import compute_scales, pack_int4, quantize_weight

triton = pytest.importorskip("triton")
from lowbit.kernels.w4a16 import w4a16_matmul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _make(N: int, K: int, group: int | None, symmetric: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    fmt = WeightFormat(bits=4, symmetric=symmetric, group_size=group, method="rtn")
    scale, zero = compute_scales(w, fmt)
    codes = quantize_weight(w, scale, zero, fmt)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(pack_int4(codes)), to(scale), to(zero)


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("K, group", [(128, 32), (200, 64), (96, None), (100, 32)])
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(
                DEVICE == "cpu", reason="Triton 3.6's interpreter mis-emulates bf16 (NumPy has no bf16); GPU only"
            ),
        ),
    ],
)
def test_matches_reference(M, K, group, dtype):
    N = 72  # not a multiple of the N tile
    qw, s, z = _make(N, K, group, seed=M + K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEVICE, dtype)
    y = w4a16_matmul(x, qw, s, None, group, K)
    ref = w4a16_reference(x, qw, s, None, group, K)
    assert y.shape == (M, N) and y.dtype == dtype
    rel = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 2e-3), rel


def test_zero_points_and_m_127():
    K, group, M = 160, 32, 127
    qw, s, z = _make(40, K, group, symmetric=False)
    x = torch.randn(M, K).to(DEVICE, torch.float16)
    ref = w4a16_reference(x, qw, s, z, group, K)
    y = w4a16_matmul(x, qw, s, z, group, K)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-3


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_matches_reference(split_k):
    K, group = 200, 32  # 7 K tiles of 32: uneven over the splits
    qw, s, _ = _make(50, K, group)
    x = torch.randn(3, K).to(DEVICE, torch.float16)
    ref = w4a16_reference(x, qw, s, None, group, K)
    y = w4a16_matmul(x, qw, s, None, group, K, split_k=split_k)
    assert y.dtype == torch.float16
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-3


def test_every_output_is_written():
    qw, s, _ = _make(70, 64, 32)
    x = torch.randn(5, 64).to(DEVICE, torch.float16)
    y = w4a16_matmul(x, qw, s, None, 32, 64)
    assert torch.isfinite(y).all()


def test_error_paths():
    qw, s, _ = _make(16, 64, 32)
    with pytest.raises(LowbitError, match="fp16 or bf16"):
        w4a16_matmul(torch.randn(2, 64, device=DEVICE), qw, s, None, 32, 64)
    x = torch.randn(2, 64).to(DEVICE, torch.float16)
    with pytest.raises(LowbitError, match=r"x must be \(M, 96\)"):
        w4a16_matmul(x, qw, s, None, 32, 96)
    with pytest.raises(LowbitError, match="scales must be fp16"):
        w4a16_matmul(x, qw, s.float(), None, 32, 64)
    with pytest.raises(LowbitError, match="split_k must be >= 1"):
        w4a16_matmul(x, qw, s, None, 32, 64, split_k=0)
    with pytest.raises(LowbitError, match="multiple of the K tile"):
        w4a16_matmul(x, qw, s, None, 32, 64, block_k=64)
