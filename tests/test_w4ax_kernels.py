"""COMET W4Ax kernels (lowbit.kernels.w4ax) against their references: mixed 8/4-bit activation layout
bit-exact, the GEMM within fp32-rounding of the reference, the reference equal to QuantLinear.forward,
the cost-balanced split-K schedule, and the error paths.

Runs in Triton's interpreter on CPU machines (tests/conftest.py) and on the GPU where there is one;
bf16 needs the GPU (NumPy, the interpreter's backend, has no bf16).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, WeightFormat
from lowbit.kernels.config import TileConfig
from lowbit.model.qlinear import QuantLinear
from lowbit.quant.fmpq import assign_fmpq_blocks
from lowbit.quant.gptq import rtn_quantize
from lowbit.numerics.primitives import pack_int4, quantize_activation

triton = pytest.importorskip("triton")
import triton.language as tl

from lowbit.kernels.w4ax import (
    block_costs,
    default_config,
    dequantize_mixed,
    pack_w4ax,
    quantize_mixed,
    quantize_mixed_reference,
    split_bounds,
    split_range,
    w4ax_gemm,
    w4ax_gemm_reference,
    w4ax_matmul,
    w4ax_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="NumPy (Triton's interpreter) has no bf16; GPU only")
M_ODD = [1, 3, 17]
# small tiles so the interpreter's runs stay short while N, K still end mid-tile; split 3 over 2-3
# blocks leaves some programs an empty range, split 2 splits the 8-bit prefix from the 4-bit rest
SMALL = TileConfig(block_m=16, block_n=32)
SMALL_SPLIT = TileConfig(block_m=16, block_n=32, swap=True, split_k=3)
SMALL_SPLIT2 = TileConfig(block_m=16, block_n=32, swap=True, split_k=2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(M, K, seed, dtype=torch.float16, outliers=3):
    """Random activations with a few outlier channels (x25), so that 8-bit blocks matter."""
    g = _gen(seed)
    x = torch.randn(M, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:outliers]] *= 25.0
    return x.to(DEVICE, dtype)


def _buffers(N, K, n_hi, seed=0, symmetric=True, smooth=False, bias=False):
    """A COMET layer's checkpoint buffers: int4 group-128 weights, a random act_perm, a prefix of n_hi 8-bit blocks."""
    g = _gen(seed)
    qw = rtn_quantize(torch.randn(N, K, generator=g), WeightFormat(group_size=128, symmetric=symmetric, method="rtn"))
    nb = -(-K // 128)
    to = lambda t: None if t is None else t.to(DEVICE)
    return {
        "qweight": to(pack_int4(qw.codes)), "scales": to(qw.scale.half()), "zeros": to(qw.zero),
        "act_perm": to(torch.randperm(K, generator=g)), "fmpq_high": to(torch.arange(nb) < n_hi),
        "smooth": to(torch.rand(K, generator=g) + 0.5) if smooth else None,
        "bias": to(torch.randn(N, generator=g).half()) if bias else None,
    }


def _rel(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


# ---- fused permute + quantize -------------------------------------------------------------------

@pytest.mark.parametrize("M", M_ODD + [127])
@pytest.mark.parametrize("K, n_hi", [(300, 1), (256, 0), (200, 2), (384, 3)])  # mixed+partial, none, all+partial, all
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_mixed_is_bit_exact(M, K, n_hi, smooth):
    x = _x(M, K, M + K)
    perm = torch.randperm(K, generator=_gen(K)).to(DEVICE)
    sm = (torch.rand(K, generator=_gen(1)) + 0.5).to(DEVICE) if smooth else None
    r = quantize_mixed_reference(x, perm, n_hi, sm)
    nb = -(-K // 128)
    for bpp in (None, 2):  # one block per program (small M), and a run of blocks (large M)
        a = quantize_mixed(x, perm, n_hi, sm, blocks_per_program=bpp)
        assert a.q_hi.shape == (M, 128 * n_hi) and a.q_hi.dtype == torch.int8
        assert a.q_lo.shape == (M, 64 * (nb - n_hi)) and a.q_lo.dtype == torch.uint8
        assert a.scales.shape == (M, nb) and a.scales.dtype == torch.float32 and a.scales.stride() == (1, M)
        for name in ("q_hi", "q_lo", "scales", "sums"):
            assert torch.equal(getattr(a, name), getattr(r, name)), (name, bpp)
    # the reference layout decodes to quantize_activation of each block of x[:, perm] (/ smooth)
    xp = (x.float() if sm is None else x.float() / sm)[:, perm]
    deq = dequantize_mixed(a)
    for b in range(nb):
        sl = slice(128 * b, min(K, 128 * (b + 1)))
        codes, scale = quantize_activation(xp[:, sl], 8 if b < n_hi else 4)
        assert torch.equal(deq[:, sl], codes.float() * scale) and torch.equal(a.scales[:, b], scale[:, 0])


def test_quantize_mixed_literal_bits():
    """One token, block 0 at 8 bits and block 1 at 4 bits, both with scale exactly 1."""
    j = torch.arange(64)
    x = torch.cat([torch.arange(128) - 127.0, (j % 15) - 7.0, 7.0 - (j % 15)])[None].to(DEVICE)
    a = quantize_mixed(x, torch.arange(256).to(DEVICE), 1)
    assert a.scales.tolist() == [[1.0, 1.0]]
    assert a.q_hi[0, :3].tolist() == [-127, -126, -125] and a.q_hi[0, 127].item() == 0
    # byte j: channel 128 + j (code j % 15 - 7, nibble j % 15 + 1) low, 192 + j (nibble 15 - j % 15) high
    assert a.q_lo[0, :2].tolist() == [0xF1, 0xE2] and a.q_lo[0, 14].item() == 0x1F
    assert a.sums.tolist() == [[-8128, 1024]]
    partial = quantize_mixed(x[:, :130].contiguous(), torch.arange(130).to(DEVICE), 1)  # 2 of 128 in block 1
    assert partial.q_lo[0, 2:].eq(0x88).all()  # padding channels hold value 0 (nibble 8)


# ---- the cost-balanced split-K schedule ---------------------------------------------------------

@triton.jit
def _probe_split(out_ptr, n_hi, n_blocks, cost_hi, cost_lo, SPLIT_K: tl.constexpr):
    pid = tl.program_id(0)
    first, last = split_range(pid, n_hi, n_blocks, cost_hi, cost_lo, SPLIT_K)
    tl.store(out_ptr + 2 * pid, first)
    tl.store(out_ptr + 2 * pid + 1, last)


@pytest.mark.parametrize("n_hi, n_blocks, cost_lo, split_k", [
    (8, 32, 704, 8), (0, 32, 704, 8), (32, 32, 704, 8), (1, 3, 900, 5), (3, 112, 512, 16), (1, 1, 1000, 4),
])
def test_split_range_partitions_blocks_by_cost(n_hi, n_blocks, cost_lo, split_k):
    cost_hi = 1024
    out = torch.zeros(2 * split_k, dtype=torch.int32, device=DEVICE)
    _probe_split[(split_k,)](out, n_hi, n_blocks, cost_hi, cost_lo, SPLIT_K=split_k)
    b = split_bounds(n_hi, n_blocks, cost_hi, cost_lo, split_k)
    assert out.view(split_k, 2).tolist() == [[b[s], b[s + 1]] for s in range(split_k)]  # kernel == mirror
    assert b[0] == 0 and b[-1] == n_blocks and all(x <= y for x, y in itertools.pairwise(b))
    cum = lambda i: cost_hi * min(i, n_hi) + cost_lo * max(0, i - n_hi)
    costs = [cum(b[s + 1]) - cum(b[s]) for s in range(split_k)]
    ideal = cum(n_blocks) / split_k
    assert max(costs) <= ideal + cost_hi  # off the ideal share by at most one block
    if (n_hi, n_blocks, split_k) == (8, 32, 8):  # equal block counts give the 8-bit splits 45% more work
        equal = [cum(4 * (s + 1)) - cum(4 * s) for s in range(split_k)]
        assert max(costs) < 0.9 * max(equal)


def test_block_costs_and_default_config():
    cfg = TileConfig(block_m=16, block_n=64, swap=True, split_k=4)
    hi, lo = block_costs(16, cfg)
    assert hi == 1024 and 0.75 * hi < lo < hi  # 4-bit blocks read 64 fewer bytes per token
    assert block_costs(1, cfg)[1] > 1024  # M = 1: the weight sums outweigh the saved activation bytes
    for M in (1, 16, 64, 256):
        c = default_config(M, 4096, 32, 132)
        assert c.swap == (M <= 64) and 1 <= c.split_k <= 16


# ---- references ---------------------------------------------------------------------------------

def _comet_layer(N, K, seed, afmt_bits=4, smooth=True):
    """A QuantLinear in the COMET format, FMPQ blocks assigned from activations with outliers."""
    g = _gen(seed)
    afmt = ActivationFormat(bits=afmt_bits, fmpq_block=128, fmpq_high_fraction=0.25)
    absmax = torch.rand(K, generator=g) + 1.0
    absmax[torch.randperm(K, generator=g)[:5]] = 40.0
    perm, high = assign_fmpq_blocks(absmax, 128, 0.25, afmt_bits)
    qw = rtn_quantize(torch.randn(N, K, generator=g), WeightFormat(group_size=128, method="rtn"))
    layer = QuantLinear.from_quantized(
        qw, afmt, in_features=K, dtype=torch.float16, bias=torch.randn(N, generator=g),
        smooth=(torch.rand(K, generator=g) + 0.5) if smooth else None, act_perm=perm, fmpq_high=high)
    return layer.to(DEVICE)


def _layer_args(layer):
    names = ("qweight", "scales", "act_perm", "fmpq_high", "zeros", "smooth", "bias")
    return {**{n: getattr(layer, n) for n in names}, "act_bits": layer.afmt.bits}


@pytest.mark.parametrize("K, bits", [(300, 4), (256, 4), (200, 8)])
def test_reference_equals_quantlinear_forward(K, bits):
    layer = _comet_layer(40, K, K, bits)
    if bits == 4:
        assert layer.fmpq_high[0] and layer.fmpq_high.sum() == 1  # an 8-bit block, as a prefix
    x = _x(5, K, 3, torch.float32)
    assert torch.equal(w4ax_reference(x, **_layer_args(layer)), layer(x))


# ---- the GEMM -----------------------------------------------------------------------------------

CASES = [  # (K, n_hi, symmetric, smooth, bias)
    (300, 1, True, True, True),  # mixed, partial last block (4-bit)
    (256, 0, True, False, False),  # no 8-bit block
    (200, 2, True, False, True),  # all 8-bit, partial last block (8-bit)
    (384, 1, False, True, False),  # zero points
]


@pytest.mark.parametrize("M", M_ODD)
@pytest.mark.parametrize("K, n_hi, symmetric, smooth, bias", CASES)
def test_w4ax_matches_reference(M, K, n_hi, symmetric, smooth, bias):
    N = 72  # not a multiple of the N tile
    buf = _buffers(N, K, n_hi, seed=K + M, symmetric=symmetric, smooth=smooth, bias=bias)
    w = pack_w4ax(**buf, in_features=K)
    assert w.n_hi == n_hi and w.n_blocks == -(-K // 128)
    x = _x(M, K, M)
    ref = w4ax_reference(x, **buf)
    acts = quantize_mixed(x, w.perm, w.n_hi, w.smooth)
    ref32 = w4ax_gemm_reference(acts, w, torch.float32)
    for cfg in (SMALL, SMALL_SPLIT, SMALL_SPLIT2):
        y32 = w4ax_gemm(acts, w, torch.float32, cfg)  # exact int32 per block: fp32 summation order only
        assert _rel(y32, ref32) < 1e-5, cfg
        y = w4ax_matmul(x, w, cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        assert _rel(y, ref) < 1e-3, cfg


def test_w4ax_larger_m():
    M, N, K = 127, 40, 300
    buf = _buffers(N, K, 1, seed=9, smooth=True, bias=True)
    w = pack_w4ax(**buf, in_features=K)
    x = _x(M, K, 9)
    ref = w4ax_reference(x, **buf)
    for cfg in (TileConfig(block_m=32, block_n=32), TileConfig(block_m=64, block_n=32, swap=True, split_k=2)):
        assert _rel(w4ax_matmul(x, w, cfg), ref) < 1e-3, cfg


# ---- the large-M path (lowbit.kernels.w4ax_dequant) ----------------------------------------------

@pytest.mark.parametrize("M, K, n_hi, smooth", [(1, 300, 1, False), (17, 384, 0, True), (127, 200, 2, True)])
def test_fake_quantize_mixed_is_the_dequantized_layout(M, K, n_hi, smooth):
    """Same codes and scales as quantize_mixed, stored as code * scale in the FMPQ column order."""
    from lowbit.kernels.w4ax_dequant import fake_quantize_mixed

    x = _x(M, K, K + M)
    perm = torch.randperm(K, generator=_gen(K)).to(DEVICE)
    sm = (torch.rand(K, generator=_gen(2)) + 0.5).to(DEVICE) if smooth else None
    expect = dequantize_mixed(quantize_mixed_reference(x, perm, n_hi, sm))
    assert torch.equal(fake_quantize_mixed(x, perm, n_hi, sm, torch.float32), expect)
    y16 = fake_quantize_mixed(x, perm, n_hi, sm)
    assert y16.dtype == torch.float16 and torch.equal(y16, expect.half())
    for rows in (False, True):  # channels gathered by the kernel, or permuted as rows of x^T first
        assert torch.equal(fake_quantize_mixed(x, perm, n_hi, sm, torch.float32, permute_rows=rows), expect), rows
    with pytest.raises(LowbitError, match="fp16, bf16 or fp32"):
        fake_quantize_mixed(x, perm, n_hi, sm, torch.int8)
    with pytest.raises(LowbitError, match="n_hi"):
        fake_quantize_mixed(x, perm, 9, sm)


@pytest.mark.parametrize("M, K, n_hi, symmetric", [(3, 300, 1, True), (17, 384, 1, False), (64, 256, 0, True)])
def test_w4ax_dequant_matmul_matches_reference(M, K, n_hi, symmetric):
    """The cuBLAS path dispatch takes at large M: W4Ax's numerics with fp16-rounded operands."""
    from lowbit.kernels import dispatch, run
    from lowbit.kernels.w4ax_dequant import w4ax_dequant_matmul

    buf = _buffers(40, K, n_hi, seed=M + K, symmetric=symmetric, smooth=True, bias=True)
    w = pack_w4ax(**buf, in_features=K)
    x = _x(M, K, M + 5)
    ref = w4ax_reference(x, **buf)
    y = w4ax_dequant_matmul(x, w)
    assert y.shape == (M, 40) and y.dtype == torch.float16
    assert _rel(y, ref) < 2e-3
    assert torch.equal(run.run_w4ax(x, w, dispatch.Choice("dequant-cublas")), y)
    with pytest.raises(LowbitError, match="x must be"):
        w4ax_dequant_matmul(x[:, :-1], w)


@pytest.mark.parametrize("M", [3, pytest.param(17, marks=GPU_ONLY)])
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)])
def test_w4ax_close_to_quantlinear_forward(M, dtype):
    layer = _comet_layer(48, 300, 7)
    x = _x(M, 300, 11, dtype)
    ref = layer(x)  # no kernel prepared: the reference forward
    y = w4ax_matmul(x, pack_w4ax(**_layer_args(layer), in_features=300), TileConfig(block_m=16, block_n=32,
                                                                                    swap=True, split_k=2))
    assert y.dtype == dtype and _rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_w4ax_default_config_and_workspace_reuse():
    """config=None picks a split-K config; two split launches in a row: nothing left in the workspace."""
    buf = _buffers(40, 300, 1, seed=5)
    w = pack_w4ax(**buf, in_features=300)
    x = _x(2, 300, 4)
    ref = w4ax_reference(x, **buf)
    assert _rel(w4ax_matmul(x, w), ref) < 1e-3
    for _ in range(2):
        assert _rel(w4ax_matmul(x, w, TileConfig(block_m=16, block_n=32, swap=True, split_k=4)), ref) < 1e-3
    assert w4ax_matmul(x[:0], w).shape == (0, 40)


# ---- errors -------------------------------------------------------------------------------------

def test_pack_w4ax_errors():
    buf = _buffers(16, 300, 1)
    with pytest.raises(LowbitError, match="prefix"):
        pack_w4ax(**{**buf, "fmpq_high": torch.tensor([False, True, False])}, in_features=300)
    with pytest.raises(LowbitError, match="group 128 and FMPQ block 128"):
        pack_w4ax(**buf, in_features=300, group_size=64)
    with pytest.raises(LowbitError, match="group 128 and FMPQ block 128"):
        pack_w4ax(**buf, in_features=300, block=64)
    with pytest.raises(LowbitError, match="4- or 8-bit"):
        pack_w4ax(**buf, in_features=300, act_bits=2)
    with pytest.raises(LowbitError, match="permutation"):
        pack_w4ax(**{**buf, "act_perm": torch.zeros(300, dtype=torch.long)}, in_features=300)
    with pytest.raises(LowbitError, match=r"fmpq_high must be \(3,\)"):
        pack_w4ax(**{**buf, "fmpq_high": torch.ones(2, dtype=torch.bool)}, in_features=300)
    with pytest.raises(LowbitError, match="smooth must be"):
        pack_w4ax(**{**buf, "smooth": torch.ones(299)}, in_features=300)
    with pytest.raises(LowbitError, match="qweight must be uint8"):
        pack_w4ax(**buf, in_features=310)
    w8 = pack_w4ax(**{**buf, "fmpq_high": torch.tensor([False, True, False])}, in_features=300, act_bits=8)
    assert w8.n_hi == 3  # 8-bit activations: every block is 8-bit, whatever fmpq_high says


def test_w4ax_call_errors():
    w = pack_w4ax(**_buffers(16, 300, 1), in_features=300)
    with pytest.raises(LowbitError, match="fp16 or bf16"):
        w4ax_matmul(torch.zeros(2, 300, dtype=torch.int8, device=DEVICE), w)
    with pytest.raises(LowbitError, match=r"x must be \(M, 300\)"):
        w4ax_matmul(_x(2, 256, 0), w)
    with pytest.raises(LowbitError, match="n_hi must be in"):
        quantize_mixed(_x(2, 300, 0), w.perm, 4)
    with pytest.raises(LowbitError, match="perm must be"):
        quantize_mixed(_x(2, 300, 0), w.perm[:10], 1)
    with pytest.raises(LowbitError, match="smooth must be fp32"):
        quantize_mixed(_x(2, 300, 0), w.perm, 1, torch.ones(300, dtype=torch.float16, device=DEVICE))
    with pytest.raises(LowbitError, match="do not match the layer"):
        w4ax_gemm(quantize_mixed(_x(2, 300, 0), w.perm, 0), w, torch.float16)
    with pytest.raises(LowbitError, match="out_dtype"):
        w4ax_gemm(quantize_mixed(_x(2, 300, 0), w.perm, 1), w, torch.int32)
