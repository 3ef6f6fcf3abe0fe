"""QUIK W4A4 kernels (lowbit.kernels.w4a4) against their references and QuantLinear's reference forward.

Fresh random data, odd shapes (M = 1, 3, 17, 127; kept columns Kq not a multiple of the tile, odd Kq;
N not a multiple of the N tile; n_out = 0, not a multiple of 16, and over one outlier tile), both
layout tiles, split-K, bias and smoothing, and the error paths. Runs in Triton's interpreter on CPU
machines (tests/conftest.py) and on the GPU where there is one; bf16 needs the GPU.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, WeightFormat, get_scheme
from lowbit.kernels.config import TileConfig
from lowbit.kernels.layout import PackedInt4, unpack_kernel_codes
from lowbit.model.qlinear import QuantLinear
from lowbit.quant.gptq import rtn_quantize
from lowbit.numerics.primitives import quantize_activation, unpack_int4

triton = pytest.importorskip("triton")
from lowbit.kernels.w4a4 import (
    SplitConfig,
    check_format,
    pack_quik,
    quik_matmul,
    quik_reference,
    split_quantize,
    split_quantize_reference,
    w4a4_matmul,
    w4a4_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="NumPy (Triton's interpreter) has no bf16; GPU only")
M_ODD = [1, 3, 17, 127]
SMALL = TileConfig(block_m=16, block_n=32)
SMALL_SPLIT = TileConfig(block_m=16, block_n=32, swap=True, split_k=3)
# (K, n_out): plain W4A4 with whole tiles; Kq = 280 (mid-tile); Kq = 163 (odd); n_out = 70 > one outlier tile
CASES = [(256, 0), (300, 20), (200, 37), (400, 70)]


def _layer(N, K, n_out, seed=0, smooth=False, bias=False, dtype=torch.float16) -> QuantLinear:
    """A QUIK layer as the calibration builds it: RTN int4 per channel on the kept columns."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    out_idx = torch.sort(torch.randperm(K, generator=g)[:n_out]).values if n_out else None
    keep = torch.ones(K, dtype=torch.bool)
    if n_out:
        keep[out_idx] = False
    qw = rtn_quantize(w[:, keep], WeightFormat(bits=4, group_size=None, method="rtn"))
    layer = QuantLinear.from_quantized(
        qw, ActivationFormat(bits=4, outlier_columns=n_out), in_features=K, dtype=dtype,
        bias=torch.randn(N, generator=g) if bias else None,
        smooth=(torch.rand(K, generator=g) + 0.5) if smooth else None,
        outlier_idx=out_idx, outlier_weight=w[:, out_idx] if n_out else None,
    )
    return layer.to(DEVICE)


def _pack(layer: QuantLinear, tile_k: int = 128, dtype=None):
    return pack_quik(layer.qweight, layer.scales, layer.in_features, layer.outlier_idx, layer.outlier_weight,
                     layer.smooth, tile_k=tile_k, dtype=dtype)


def _x(layer: QuantLinear, M, seed, dtype=torch.float16):
    """Activations whose outlier columns are large, as the calibration picks them."""
    x = torch.randn(M, layer.in_features, generator=torch.Generator().manual_seed(seed))
    if layer.outlier_idx is not None:
        x[:, layer.outlier_idx.cpu()] *= 20
    return x.to(DEVICE, dtype)


def _rel(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


# ---- layout -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tile_k", [128, 256])
def test_pack_quik_layout(tile_k):
    layer = _layer(24, 300, 20, smooth=True)
    p = _pack(layer, tile_k)
    Kq, half = 280, tile_k // 2
    assert p.Kq == Kq and p.n_out == 20 and p.weight.Kp % tile_k == 0 and p.gather_idx.dtype == torch.int32
    # byte b of tile t: low nibble <- kept column t*T + j, high <- t*T + T/2 + j; padding -1
    b = torch.arange(p.weight.Kp // 2)
    col_lo = (b // half) * tile_k + b % half
    for row, col in ((0, col_lo), (1, col_lo + half)):
        src = p.gather_idx[row].cpu().long()
        inside = col < Kq
        assert torch.equal(src[inside], layer.kept_idx().cpu()[col[inside]]) and (src[~inside] == -1).all()
        assert torch.equal(p.gather_smooth[row].cpu()[inside], layer.smooth.cpu()[src[inside]])
    codes = unpack_int4(layer.qweight, Kq, signed=True)
    assert torch.equal(p.w_sum, codes.sum(1).to(torch.int32))
    assert torch.equal(unpack_kernel_codes(p.weight), codes.to(torch.int16) + 8)
    assert p.outlier_weight.shape == (24, 32) and (p.outlier_weight[:, 20:] == 0).all()
    assert torch.equal(p.outlier_weight[:, :20], layer.outlier_weight)


# ---- 1. split and quantize ------------------------------------------------------------------------

@pytest.mark.parametrize("M", M_ODD)
@pytest.mark.parametrize("K, n_out", CASES)
@pytest.mark.parametrize("smooth", [False, True])
def test_split_quantize_is_bit_exact(M, K, n_out, smooth):
    layer = _layer(8, K, n_out, seed=K, smooth=smooth)
    x = _x(layer, M, M) * 3
    for tile_k in (128, 256):
        p = _pack(layer, tile_k)
        got, ref = split_quantize(x, p), split_quantize_reference(x, p)
        for name, a, b in zip(got._fields, got, ref):
            assert a.dtype == b.dtype and torch.equal(a, b), (name, tile_k)
    # and the reference against the primitive itself, in natural column order
    xf = x.float() if layer.smooth is None else x.float() / layer.smooth
    q, s = quantize_activation(xf[:, layer.kept_idx()] if n_out else xf, 4, "int")
    u = unpack_kernel_codes(PackedInt4(got.codes, p.weight.scales, None, None, p.Kq, tile_k=256))
    assert torch.equal(u.to(torch.int8) - 8, q) and torch.equal(got.scales, s[:, 0])
    assert torch.equal(got.sums, (q.to(torch.int32) + 8).sum(1, dtype=torch.int32) + 8 * (p.weight.Kp - p.Kq))
    if n_out:
        assert torch.equal(got.outliers, xf[:, layer.outlier_idx].half())


# ---- 2. the GEMM ------------------------------------------------------------------------------------

@pytest.mark.parametrize("M", M_ODD)
@pytest.mark.parametrize("K, n_out", CASES)
def test_w4a4_gemm_matches_reference(M, K, n_out):
    N = 72  # not a multiple of the N tile
    layer = _layer(N, K, n_out, seed=M + K)
    p = _pack(layer)
    acts = split_quantize(_x(layer, M, M), p)
    ref = w4a4_reference(acts, p, torch.float16)
    big = TileConfig(block_m=64, block_n=64, num_warps=8)  # the large-M shape of tile
    for cfg in (SMALL, SMALL_SPLIT) + ((big,) if M == 127 else ()):
        y = w4a4_matmul(acts, p, torch.float16, config=cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        if n_out == 0 and cfg.split_k == 1:
            assert torch.equal(y, ref)  # integer part exact, same fp32 epilogue: bit for bit
        else:
            assert _rel(y, ref) < 1e-3, cfg  # fp16 outlier MMA / split-K partials vs fp32


def test_w4a4_tile_256_and_default_config():
    layer = _layer(40, 600, 20, seed=5, bias=True)
    x = _x(layer, 5, 5)
    p = _pack(layer, 256)
    acts = split_quantize(x, p)
    ref = w4a4_reference(acts, p, torch.float16, layer.bias)
    assert _rel(w4a4_matmul(acts, p, torch.float16, layer.bias, SMALL_SPLIT), ref) < 1e-3
    assert _rel(w4a4_matmul(acts, p, torch.float16, layer.bias), ref) < 1e-3


def test_w4a4_split_k_leaves_workspace_clean():
    """Two launches in a row: the second would double-count if the first left partial sums behind."""
    layer = _layer(50, 700, 40, seed=2)
    p = _pack(layer)
    acts = split_quantize(_x(layer, 3, 2), p)
    ref = w4a4_reference(acts, p, torch.float16)
    cfg = TileConfig(block_m=16, block_n=32, swap=True, split_k=4)
    for _ in range(2):
        assert _rel(w4a4_matmul(acts, p, torch.float16, config=cfg), ref) < 1e-3


# ---- 3. end to end against the library's spec ---------------------------------------------------------

@pytest.mark.parametrize("M", [1, 17])
@pytest.mark.parametrize("K, n_out", CASES)
@pytest.mark.parametrize("extras", [False, True])
def test_quik_matmul_matches_quantlinear_forward(M, K, n_out, extras):
    layer = _layer(40, K, n_out, seed=K + M, smooth=extras, bias=extras)
    x = _x(layer, M, K)
    spec = layer(x)  # QuantLinear's reference path (no kernels prepared)
    ref = quik_reference(x, layer.qweight, layer.scales, K, layer.outlier_idx, layer.outlier_weight,
                         layer.smooth, layer.bias)
    assert torch.equal(ref, spec)
    y = quik_matmul(x, _pack(layer), layer.bias, SMALL_SPLIT, SplitConfig(num_warps=2))
    assert y.shape == spec.shape and y.dtype == torch.float16
    assert _rel(y, spec) < 2e-3


def test_quik_matmul_empty_batch():
    layer = _layer(16, 200, 20)
    y = quik_matmul(_x(layer, 1, 0)[:0], _pack(layer))
    assert y.shape == (0, 16)


@GPU_ONLY
@pytest.mark.parametrize("M", M_ODD)
def test_quik_bf16_on_gpu(M):
    layer = _layer(72, 300, 20, seed=M, smooth=True, bias=True, dtype=torch.bfloat16)
    x = _x(layer, M, M, torch.bfloat16)
    p = _pack(layer)
    acts = split_quantize(x, p)
    ref = split_quantize_reference(x, p)
    assert all(torch.equal(a, b) for a, b in zip(acts, ref))
    for cfg in (None, SMALL, SMALL_SPLIT):
        assert _rel(w4a4_matmul(acts, p, torch.bfloat16, layer.bias, cfg), w4a4_reference(acts, p, torch.bfloat16,
                                                                                          layer.bias)) < 1e-2
    assert _rel(quik_matmul(x, p, layer.bias), layer(x)) < 1e-2


# ---- formats and errors ------------------------------------------------------------------------------

def test_check_format_takes_quik_and_w4a4_only():
    quik = get_scheme("w4a4-quik")
    check_format(*quik.for_layer("model.layers.0.self_attn.q_proj"))
    check_format(*get_scheme("w4a4").for_layer("model.layers.0.mlp.up_proj"))
    for scheme, name in (("w4a4-quik", "model.layers.0.mlp.down_proj"),  # W8A8 override: the w8a8 kernel
                         ("w4a8", "x"), ("w4a4kv4-comet", "x"), ("w4a16", "x")):
        with pytest.raises(LowbitError, match="W4A4 kernel takes"):
            check_format(*get_scheme(scheme).for_layer(name))


def test_pack_quik_errors():
    layer = _layer(16, 200, 20)
    qw, s, idx, ow = layer.qweight, layer.scales, layer.outlier_idx, layer.outlier_weight
    with pytest.raises(LowbitError, match="per-channel"):
        pack_quik(qw, torch.cat([s, s], 1), 200, idx, ow)
    with pytest.raises(LowbitError, match="both or neither"):
        pack_quik(qw, s, 200, idx, None)
    with pytest.raises(LowbitError, match="ascending"):
        pack_quik(qw, s, 200, idx.flip(0), ow)
    with pytest.raises(LowbitError, match="outlier_weight must be fp16/bf16"):
        pack_quik(qw, s, 200, idx, ow.float())
    with pytest.raises(LowbitError, match="qweight must be uint8"):
        pack_quik(qw, s, 201, idx, ow)  # in_features disagrees with the packed codes
    with pytest.raises(LowbitError, match="smooth must be fp32"):
        pack_quik(qw, s, 200, idx, ow, torch.ones(199, device=DEVICE))
    with pytest.raises(LowbitError, match="tile must be one of"):
        pack_quik(qw, s, 200, idx, ow, tile_k=64)
    with pytest.raises(LowbitError, match="must number"):
        pack_quik(qw, s, 20, idx, ow)
    with pytest.raises(LowbitError, match="num_warps"):
        SplitConfig(num_warps=3)


def test_kernel_errors():
    layer = _layer(16, 200, 20)
    p = _pack(layer)
    x = _x(layer, 2, 0)
    with pytest.raises(LowbitError, match="fp16 or bf16"):
        quik_matmul(x.float(), p)
    with pytest.raises(LowbitError, match=r"x must be \(M, 200\)"):
        quik_matmul(x[:, :199], p)
    p_bf = _pack(layer, dtype=torch.bfloat16)
    with pytest.raises(LowbitError, match="pack the layer with pack_quik"):
        split_quantize(x, p_bf)
    acts = split_quantize(x, p)
    with pytest.raises(LowbitError, match="quantize them with split_quantize"):
        w4a4_matmul(acts._replace(codes=acts.codes[:, :-1]), p, torch.float16)
    with pytest.raises(LowbitError, match="code sums int32"):
        w4a4_matmul(acts._replace(sums=acts.sums.long()), p, torch.float16)
    with pytest.raises(LowbitError, match="outlier activations must be"):
        w4a4_matmul(acts._replace(outliers=acts.outliers[:, :5]), p, torch.float16)
    with pytest.raises(LowbitError, match="out_dtype"):
        w4a4_matmul(acts, p, torch.float32)
    with pytest.raises(LowbitError, match="bias must be"):
        w4a4_matmul(acts, p, torch.float16, torch.zeros(5, device=DEVICE, dtype=torch.float16))
