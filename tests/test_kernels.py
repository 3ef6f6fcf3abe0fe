"""Triton kernels against their PyTorch references: fresh random data, odd shapes, every variant, errors.

Runs in Triton's interpreter on CPU machines (tests/conftest.py sets TRITON_INTERPRET) and on the
GPU where there is one. bf16 and fp8 need the GPU: Triton 3.6's interpreter goes through NumPy,
which has neither type.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import WeightFormat
from lowbit.kernels.config import TileConfig
from lowbit.kernels.layout import pack_for_kernels, unpack_kernel_codes
from lowbit.kernels.reference import w4a8_reference, w4a16_reference, w8a8_reference
from lowbit.numerics.primitives import compute_scales, pack_int4, quantize_activation, quantize_weight

triton = pytest.importorskip("triton")
from lowbit.kernels.act_quant import quantize_activations  # noqa: E402
from lowbit.kernels.gemv import GEMV_MAX_M, w4a8_gemv  # noqa: E402
from lowbit.kernels.w4a8 import w4a8_matmul  # noqa: E402
from lowbit.kernels.w4a16 import w4a16_matmul  # noqa: E402
from lowbit.kernels.w8a8 import w8a8_matmul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="NumPy (Triton's interpreter) has no bf16 / fp8; GPU only")
BF16 = pytest.param(torch.bfloat16, marks=GPU_ONLY)
FP8 = pytest.param("fp8_e4m3", marks=GPU_ONLY)
M_ODD = [1, 3, 17, 127]
# small tiles so that the interpreter's runs stay short while N, K still end mid-tile
SMALL = TileConfig(block_m=16, block_n=32)
SMALL_SPLIT = TileConfig(block_m=16, block_n=32, swap=True, split_k=3)


def _weights(N, K, group, symmetric=True, seed=0, g_idx=None, tile_k=128):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    fmt = WeightFormat(bits=4, symmetric=symmetric, group_size=group, method="rtn")
    scale, zero = compute_scales(w, fmt, g_idx=g_idx)
    codes = quantize_weight(w, scale, zero, fmt, g_idx=g_idx)
    qw = pack_int4(codes)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    packed = pack_for_kernels(to(qw), to(scale), to(zero), group, K, g_idx=to(g_idx), tile_k=tile_k)
    return to(qw), to(scale), to(zero), packed


def _rel(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _x(M, K, seed, dtype=torch.float16):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


# ---- layout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("K, group, symmetric", [(200, 32, True), (300, 128, False), (64, None, True)])
@pytest.mark.parametrize("tile_k", [128, 256])
def test_layout_round_trips_codes_and_pads_with_zero_value(K, group, symmetric, tile_k):
    qw, s, z, p = _weights(24, K, group, symmetric, tile_k=tile_k)
    from lowbit.numerics.primitives import unpack_int4

    ref = unpack_int4(qw, K, signed=symmetric).to(torch.int16) + (8 if symmetric else 0)
    assert torch.equal(unpack_kernel_codes(p), ref)
    assert p.Kp % tile_k == 0 and p.scales.shape == (s.shape[1], s.shape[0])
    full = torch.stack([p.qweight & 0xF, p.qweight >> 4], 1)  # padding codes decode to value 0
    assert full.numel() == 24 * p.Kp


def test_layout_rejects_bad_inputs():
    qw, s, z, _ = _weights(8, 64, 32)
    with pytest.raises(LowbitError, match="qweight must be uint8"):
        pack_for_kernels(qw.to(torch.int8), s, z, 32, 64)
    with pytest.raises(LowbitError, match="scales must be fp16"):
        pack_for_kernels(qw, s.float(), z, 32, 64)
    with pytest.raises(LowbitError, match="qweight must be uint8"):
        pack_for_kernels(qw, s, z, 32, 66)
    with pytest.raises(LowbitError, match="tile must be one of"):
        pack_for_kernels(qw, s, z, 32, 64, tile_k=64)


# ---- W4A16 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("M", M_ODD)
@pytest.mark.parametrize("K, group, symmetric", [(128, 32, True), (200, 64, False), (96, None, True),
                                                 (300, 128, True), (260, 128, False), (520, 256, True)])
@pytest.mark.parametrize("dtype", [torch.float16, BF16])
@pytest.mark.parametrize("tile_k", [128, 256])
def test_w4a16_matches_reference(M, K, group, symmetric, dtype, tile_k):
    N = 72  # not a multiple of the N tile
    qw, s, z, p = _weights(N, K, group, symmetric, seed=M + K, tile_k=tile_k)
    x = _x(M, K, M, dtype)
    ref = w4a16_reference(x, qw, s, z, group, K)
    for cfg in (SMALL, SMALL_SPLIT):
        y = w4a16_matmul(x, p, config=cfg)
        assert y.shape == (M, N) and y.dtype == dtype
        assert _rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3), cfg


def test_w4a16_act_order_and_bias():
    K, group = 256, 64
    g_idx = torch.randperm(K, generator=torch.Generator().manual_seed(1)) // group  # shuffled groups
    qw, s, z, p = _weights(40, K, group, g_idx=g_idx)
    assert p.perm is not None
    from lowbit.numerics.primitives import dequantize_weight, unpack_int4

    w = dequantize_weight(unpack_int4(qw, K, True), s, z, WeightFormat(group_size=group, method="rtn"), g_idx.to(DEVICE))
    x, bias = _x(5, K, 0), torch.randn(40).to(DEVICE, torch.float16)
    ref = x.float() @ w.t() + bias.float()
    assert _rel(w4a16_matmul(x, p, bias, SMALL), ref) < 2e-3


def test_w4a16_split_k_leaves_workspace_clean():
    """Two launches in a row: the second would double-count if the first left partial sums behind."""
    qw, s, z, p = _weights(50, 640, 128)
    x = _x(3, 640, 2)
    ref = w4a16_reference(x, qw, s, z, 128, 640)
    cfg = TileConfig(block_m=16, block_n=32, swap=True, split_k=4)
    for _ in range(2):
        assert _rel(w4a16_matmul(x, p, config=cfg), ref) < 2e-3


def test_w4a16_errors():
    _, _, _, p = _weights(16, 64, 32)
    with pytest.raises(LowbitError, match="fp16 or bf16"):
        w4a16_matmul(torch.randn(2, 64, device=DEVICE), p)
    with pytest.raises(LowbitError, match=r"x must be \(M, 64\)"):
        w4a16_matmul(_x(2, 96, 0), p)
    with pytest.raises(LowbitError, match="power of two"):
        TileConfig(block_n=48)
    with pytest.raises(LowbitError, match="invalid TileConfig"):
        TileConfig(split_k=0)


# ---- activation quantization ------------------------------------------------------------------

@pytest.mark.parametrize("M, K", [(1, 100), (3, 4096), (17, 577), (127, 130), (520, 300)])  # 520: the many-rows launch
@pytest.mark.parametrize("dtype", ["int", FP8])
def test_act_quant_is_bit_exact(M, K, dtype):
    x = _x(M, K, K) * 3
    smooth = (torch.rand(K, generator=torch.Generator().manual_seed(K)) + 0.5).to(DEVICE)
    for sm in (None, smooth):
        q, s = quantize_activations(x, dtype, sm)
        rq, rs = quantize_activation(x.float() if sm is None else x.float() / sm, 8, dtype)
        assert torch.equal(q.view(torch.int8), rq.view(torch.int8)) and torch.equal(s, rs[:, 0])


def test_act_quant_errors():
    with pytest.raises(LowbitError, match="fp16/bf16/fp32"):
        quantize_activations(torch.zeros(2, 3, dtype=torch.int8, device=DEVICE))
    with pytest.raises(LowbitError, match="dtype must be"):
        quantize_activations(_x(2, 8, 0), "int4")
    with pytest.raises(LowbitError, match="smooth must be fp32"):
        quantize_activations(_x(2, 8, 0), "int", torch.ones(7, device=DEVICE))


# ---- W4A8 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("M", M_ODD)
@pytest.mark.parametrize("K, group, symmetric", [(160, None, True), (200, None, False), (300, 128, True), (260, 128, False),
                                                 (200, 64, True)])
@pytest.mark.parametrize("adtype", ["int", FP8])
@pytest.mark.parametrize("tile_k", [128, 256])
def test_w4a8_matches_reference(M, K, group, symmetric, adtype, tile_k):
    N = 40
    qw, s, z, p = _weights(N, K, group, symmetric, seed=K, tile_k=tile_k)
    xq, xs = quantize_activations(_x(M, K, M), adtype)
    if group and group % (tile_k // 2):  # a group smaller than a tile half has no kernel here
        with pytest.raises(LowbitError, match="multiples of"):
            w4a8_matmul(xq, xs, p, torch.float16)
        return
    ref = w4a8_reference(xq, xs, qw, s, z, group, K, torch.float16)
    for cfg in (SMALL, SMALL_SPLIT):
        y = w4a8_matmul(xq, xs, p, torch.float16, config=cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        assert _rel(y, ref) < 2e-3, cfg


def test_w4a8_errors():
    _, _, _, p32 = _weights(16, 128, 32)
    xq, xs = quantize_activations(_x(2, 128, 0))
    with pytest.raises(LowbitError, match="multiples of 64"):  # a group per tile half (64 of 128)
        w4a8_matmul(xq, xs, p32, torch.float16)
    _, _, _, p = _weights(16, 128, None)
    with pytest.raises(LowbitError, match="int8 or float8"):
        w4a8_matmul(_x(2, 128, 0), xs, p, torch.float16)
    with pytest.raises(LowbitError, match="x_scale must be fp32"):
        w4a8_matmul(xq, xs.half(), p, torch.float16)


# ---- W4A8 GEMV (dp4a, 1..4 rows) ---------------------------------------------------------------

@pytest.mark.parametrize("M", [1, 2, 3, GEMV_MAX_M])
@pytest.mark.parametrize("K, symmetric, tile_k", [(160, True, 128), (200, False, 256), (1028, True, 256), (520, False, 128)])
def test_w4a8_gemv_matches_reference(M, K, symmetric, tile_k):
    N = 40
    qw, s, z, p = _weights(N, K, None, symmetric, seed=K + M, tile_k=tile_k)
    xq, xs = quantize_activations(_x(M, K, M + 7), "int")
    bias = torch.randn(N, generator=torch.Generator().manual_seed(M)).to(DEVICE, torch.float16)
    ref = w4a8_reference(xq, xs, qw, s, z, None, K, torch.float16)
    # one step per program, steps shared by split-K programs (3 of 2-3 steps each), a step past Kp;
    # 1, 2 and 3 steps loaded ahead (num_stages), so that buffers run past the last step too; the
    # bias (the shared epilogue) with the split-K config only: interpreted in CI, each launch costs
    for i, cfg in enumerate((TileConfig(block_n=32, block_k=64, num_stages=1),
                             TileConfig(block_n=16, block_k=128, split_k=3, num_stages=2),
                             TileConfig(block_n=64, block_k=1024, split_k=2, num_stages=3),
                             TileConfig(block_n=16, block_k=32, num_stages=3))):
        y = w4a8_gemv(xq, xs, p, torch.float16, config=cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        assert _rel(y, ref) < 1e-3, cfg
        if i == 1:
            yb = w4a8_gemv(xq, xs, p, torch.float16, bias, config=cfg)
            assert _rel(yb, ref.float() + bias.float()) < 1e-3, cfg
    assert _rel(w4a8_gemv(xq, xs, p, torch.float16), ref) < 1e-3  # the default launch
    # what dispatch runs for a table entry naming it
    from lowbit.kernels.dispatch import Choice
    from lowbit.kernels.run import run_w4a8_quantized

    y = run_w4a8_quantized(xq, xs, p, torch.float16, Choice("gemv", TileConfig(block_n=32, block_k=64)))
    assert _rel(y, ref) < 1e-3


def test_w4a8_gemv_errors():
    _, _, _, p = _weights(16, 128, None)
    xq, xs = quantize_activations(_x(GEMV_MAX_M + 1, 128, 0))
    with pytest.raises(LowbitError, match=f"1..{GEMV_MAX_M} rows"):
        w4a8_gemv(xq, xs, p, torch.float16)
    xq, xs = quantize_activations(_x(2, 128, 0))
    _, _, _, pg = _weights(16, 128, 128)
    with pytest.raises(LowbitError, match="per-channel"):
        w4a8_gemv(xq, xs, pg, torch.float16)
    with pytest.raises(LowbitError, match="takes int8"):
        w4a8_gemv(_x(2, 128, 0), xs, p, torch.float16)
    with pytest.raises(LowbitError, match="x_scale must be fp32"):
        w4a8_gemv(xq, xs.half(), p, torch.float16)
    with pytest.raises(LowbitError, match="multiple of 32"):
        w4a8_gemv(xq, xs, p, torch.float16, config=TileConfig(block_k=16))
    with pytest.raises(LowbitError, match="num_stages"):
        w4a8_gemv(xq, xs, p, torch.float16, config=TileConfig(block_k=32, num_stages=4))
    _, _, _, p6 = _weights(16, 126, None)
    x6, xs6 = quantize_activations(_x(1, 126, 0))
    with pytest.raises(LowbitError, match="multiple of 4"):
        w4a8_gemv(x6, xs6, p6, torch.float16)


# ---- W8A8 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("M", M_ODD)
@pytest.mark.parametrize("adtype", ["int", FP8])
def test_w8a8_matches_reference(M, adtype):
    N, K = 72, 300
    xq, xs = quantize_activations(_x(M, K, M), adtype)
    wq, wsc = quantize_activation(torch.randn(N, K).to(DEVICE), 8, adtype)
    wsc = wsc[:, 0].half()
    ref = w8a8_reference(xq, xs, wq, wsc, torch.float16)
    for cfg in (TileConfig(block_m=16, block_n=32, block_k=64), TileConfig(block_m=16, block_n=32, block_k=32,
                                                                           swap=True, split_k=3)):
        assert _rel(w8a8_matmul(xq, xs, wq, wsc, torch.float16, config=cfg), ref) < 2e-3


def test_w8a8_errors():
    xq, xs = quantize_activations(_x(2, 64, 0))
    wq = torch.zeros(8, 64, dtype=torch.int8, device=DEVICE)
    with pytest.raises(LowbitError, match="w_scale must be"):
        w8a8_matmul(xq, xs, wq, torch.ones(7, device=DEVICE), torch.float16)
    with pytest.raises(LowbitError, match="weights must be"):
        w8a8_matmul(xq, xs, wq.float(), torch.ones(8, device=DEVICE), torch.float16)


# ---- widening for the large-M paths ------------------------------------------------------------

@pytest.mark.parametrize("K, group, symmetric", [(200, None, True), (260, None, False), (300, 128, True), (200, 64, False)])
@pytest.mark.parametrize("tile_k", [128, 256])
def test_widen_matches_dequantized_weights(K, group, symmetric, tile_k):
    from lowbit.kernels.widen import widen_int4
    from lowbit.numerics.primitives import dequantize_weight, unpack_int4

    qw, s, z, p = _weights(40, K, group, symmetric, seed=3, tile_k=tile_k)
    codes = unpack_int4(qw, K, signed=symmetric)
    fmt = WeightFormat(bits=4, symmetric=symmetric, group_size=group, method="rtn")
    ref = dequantize_weight(codes, s, z, fmt)
    assert torch.allclose(widen_int4(p, torch.float16).float(), ref, rtol=1e-3, atol=1e-5)
    if group is None:
        q = widen_int4(p, torch.int8)
        exact = codes.to(torch.int16) - (z.to(torch.int16) if z is not None else 0)
        assert q.dtype == torch.int8 and torch.equal(q.to(torch.int16), exact)
    else:
        with pytest.raises(LowbitError, match="one scale per channel"):
            widen_int4(p, torch.int8)
