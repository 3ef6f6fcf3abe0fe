"""GPTQ's one-launch block sweep (``lowbit.kernels.gptq_sweep``) against its PyTorch loop, bit for bit:
in Triton's interpreter on the CPU and compiled on a GPU; odd row counts, short last blocks,
symmetric and zero-point formats; and the errors for inputs it cannot take."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import WeightFormat
from lowbit.numerics.primitives import int_range

pytest.importorskip("triton")
from lowbit.kernels.gptq_sweep import sweep_block, sweep_block_reference  # noqa: E402
from lowbit.quant import gptq  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _block(N: int, B: int, symmetric: bool, seed: int):
    """Random weights, a real upper Cholesky factor of an inverse Hessian, and per-column scales."""
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(N, B, generator=g)
    x = torch.randn(4 * B + 7, B, generator=g) * (0.2 + torch.rand(B, generator=g))
    H = 2 * x.double().T @ x.double() / x.shape[0] + 0.01 * torch.eye(B, dtype=torch.float64)
    U1 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    lo, hi = int_range(4, symmetric)
    s = (W1.abs().amax(1, keepdim=True) / 7.5).expand(N, B).contiguous() * (0.8 + 0.4 * torch.rand(N, B, generator=g))
    z = None if symmetric else torch.randint(6, 10, (N, B), generator=g).float()
    return [t if t is None else t.to(DEVICE) for t in (W1, U1, s, z)] + [lo, hi]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("N, B", [(1, 128), (3, 37), (17, 128), (127, 64), (40, 5)])
def test_sweep_block_equals_the_reference_bit_for_bit(N, B, symmetric):
    W1, U1, s, z, lo, hi = _block(N, B, symmetric, seed=N * 1000 + B)
    codes, errs = sweep_block(W1, U1, s, z, lo, hi)
    ref_codes, ref_errs = sweep_block_reference(W1.clone(), U1, s, z, lo, hi)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(errs, ref_errs)
    assert codes.min() >= lo and codes.max() <= hi
    assert (errs != 0).any()  # the error feedback is exercised, not a trivial block


def test_sweep_block_rejects_what_it_cannot_take():
    W1, U1, s, z, lo, hi = _block(4, 16, False, seed=1)
    with pytest.raises(LowbitError, match="B <= 256"):
        sweep_block(torch.zeros(4, 300, device=DEVICE), torch.zeros(300, 300, device=DEVICE),
                    torch.ones(4, 300, device=DEVICE), None, lo, hi)
    with pytest.raises(LowbitError, match="U1"):
        sweep_block(W1, U1[:8, :8], s, z, lo, hi)
    with pytest.raises(LowbitError, match="fp32"):
        sweep_block(W1.double(), U1, s, z, lo, hi)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", [WeightFormat(bits=4, group_size=128), WeightFormat(bits=4, group_size=32, symmetric=False),
                                 WeightFormat(bits=4, group_size=128, act_order=True)])
def test_gptq_on_gpu_uses_the_kernel_and_equals_the_loop(fmt, monkeypatch):
    """The whole GPTQ sweep on the GPU through the kernel against the same sweep through the PyTorch loop
    on the same GPU: identical codes and scales (same Cholesky factor, same block GEMMs)."""
    g = torch.Generator().manual_seed(3)
    N, K = 131, 389
    w = torch.randn(N, K, generator=g).cuda()
    x = torch.randn(3000, K, generator=g) * torch.rand(K, generator=g) * 2
    H = (2 * x.double().T @ x.double() / 3000).cuda()
    fast, _ = gptq.gptq_quantize(w, H, fmt)
    calls = []
    monkeypatch.setattr(gptq.gptq_sweep, "sweep_block", lambda *a: calls.append(1) or sweep_block_reference(*a))
    slow, _ = gptq.gptq_quantize(w, H, fmt)
    assert calls  # the GPU path went through sweep_block
    assert torch.equal(fast.codes, slow.codes) and torch.equal(fast.scale, slow.scale)
