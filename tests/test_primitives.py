"""Bit-exact checks of the quantization primitives against literal values."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, WeightFormat
from lowbit.numerics.primitives import (
    compute_scales,
    dequantize_weight,
    fake_quantize_activation,
    group_index,
    pack_int4,
    quantize_activation,
    quantize_weight,
    unpack_int4,
)


def test_pack_int4_literal_nibbles():
    codes = torch.tensor([[1, -1, 7, -8, 0]], dtype=torch.int8)  # odd K: padded with a zero nibble
    packed = pack_int4(codes)
    # byte 0: low=1 (0001), high=-1 (1111) -> 0xF1; byte 1: low=7, high=-8 (1000) -> 0x87; byte 2: low=0 -> 0x00
    assert packed.tolist() == [[0xF1, 0x87, 0x00]]
    assert torch.equal(unpack_int4(packed, 5, signed=True), codes)
    u = torch.tensor([[15, 0, 9, 6]], dtype=torch.uint8)
    assert pack_int4(u).tolist() == [[0x0F, 0x69]]
    assert torch.equal(unpack_int4(pack_int4(u), 4, signed=False), u)


def test_pack_roundtrip_random():
    codes = torch.randint(-8, 8, (7, 33), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes), 33, signed=True), codes)
    with pytest.raises(LowbitError, match="int8 or uint8"):
        pack_int4(codes.int())


def test_symmetric_int4_literal():
    w = torch.tensor([[7.5, -7.5, 1.0, 3.5, 2.5, -0.4]])  # absmax 7.5 -> scale exactly 1.0
    fmt = WeightFormat(bits=4, group_size=None, method="rtn")
    scale, zero = compute_scales(w, fmt)
    assert zero is None and scale.dtype == torch.float16 and scale.item() == 1.0
    codes = quantize_weight(w, scale, zero, fmt)
    # round half to even: 7.5 -> 8, clamped to 7; -7.5 -> -8; 3.5 -> 4; 2.5 -> 2
    assert codes.dtype == torch.int8 and codes.tolist() == [[7, -8, 1, 4, 2, 0]]
    assert dequantize_weight(codes, scale, zero, fmt).tolist() == [[7.0, -8.0, 1.0, 4.0, 2.0, 0.0]]


def test_asymmetric_int4_literal():
    w = torch.tensor([[0.0, 1.5, 3.0, -1.5]])
    fmt = WeightFormat(bits=4, symmetric=False, group_size=None, method="rtn")
    scale, zero = compute_scales(w, fmt)
    assert scale.item() == pytest.approx(0.3, abs=1e-4) and zero.tolist() == [[5]]
    codes = quantize_weight(w, scale, zero, fmt)
    assert codes.tolist() == [[5, 10, 15, 0]]
    torch.testing.assert_close(dequantize_weight(codes, scale, zero, fmt), w, atol=2e-3, rtol=0)


def test_groups_and_partial_last_group():
    assert group_index(5, 32).tolist() == [0] * 5
    assert group_index(70, 32)[[0, 31, 32, 63, 64, 69]].tolist() == [0, 0, 1, 1, 2, 2]
    w = torch.randn(3, 70)
    fmt = WeightFormat(bits=4, group_size=32, method="rtn")
    scale, _ = compute_scales(w, fmt)
    assert scale.shape == (3, 3)
    expected_last = w[:, 64:].abs().amax(1) / 7.5
    torch.testing.assert_close(scale[:, 2].float(), expected_last, rtol=1e-3, atol=0)


def test_rtn_error_bound_and_clip():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    fmt = WeightFormat(bits=4, group_size=64, method="rtn")
    scale, zero = compute_scales(w, fmt)
    err = (dequantize_weight(quantize_weight(w, scale, zero, fmt), scale, zero, fmt) - w).abs()
    # half a step, plus the fp16 rounding of the scale at the clamped positive extreme (7.5 -> 7)
    # (fp16 keeps 11 bits: 7.5 steps x 2**-11 = 0.004 of a step)
    assert (err <= scale.float().repeat_interleave(64, 1) * (0.5 + 0.004)).all()
    clipped, _ = compute_scales(w, fmt, clip=torch.full((16,), 0.8))
    torch.testing.assert_close(clipped.float(), (scale.float() * 0.8), rtol=1e-3, atol=0)


def test_int8_and_fp8_weights():
    w = torch.tensor([[1.0, -2.0, 0.5]])
    fmt8 = WeightFormat(bits=8, group_size=None, method="rtn")
    s, z = compute_scales(w, fmt8)
    assert quantize_weight(w, s, z, fmt8).tolist() == [[64, -128, 32]]  # 2/127.5 step: -127.5 -> -128
    fp8 = WeightFormat(bits=8, dtype="fp8_e4m3", group_size=None, method="rtn")
    s, z = compute_scales(w, fp8)
    codes = quantize_weight(w, s, z, fp8)
    assert codes.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(dequantize_weight(codes, s, z, fp8), w, rtol=0.07, atol=0)


def test_activation_per_token_literal():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    codes, scale = quantize_activation(x, 8)
    assert codes[0].tolist() == [127, -64, 32, 0]  # -63.5 rounds to -64 (half to even)
    assert codes[1].tolist() == [0, 0, 0, 0] and torch.isfinite(scale).all()
    c4, s4 = quantize_activation(torch.tensor([[7.0, -3.5, 2.0, 0.0]]), 4)  # scale exactly 1
    assert c4.tolist() == [[7, -4, 2, 0]] and s4.item() == 1.0


def test_fmpq_blocks_use_their_own_scale_and_bits():
    torch.manual_seed(1)
    x = torch.randn(5, 96)
    x[:, 40] = 50.0  # an outlier channel in block 1 (channels 32..63)
    fmt = ActivationFormat(bits=4, fmpq_block=32, fmpq_high_fraction=0.34)
    high = torch.tensor([False, True, False])
    y = fake_quantize_activation(x, fmt, high)
    for b, bits in enumerate((4, 8, 4)):
        sl = slice(32 * b, 32 * (b + 1))
        c, s = quantize_activation(x[:, sl], bits)
        assert torch.equal(y[:, sl], c.float() * s)
    plain = fake_quantize_activation(x, ActivationFormat(bits=4))
    assert (y - x).norm() < 0.2 * (plain - x).norm()  # per-block scales isolate the outlier


@pytest.mark.parametrize("K, group_size, symmetric", [(300, 128, True), (300, 128, False), (256, 64, False),
                                                       (37, None, True), (37, None, False), (5, 128, True)])
def test_compute_scales_natural_groups_equal_the_scatter_path(K, group_size, symmetric):
    """Natural-order groups take a reshape and one reduction, act-order ones scatter_reduce: passing the
    natural group of each column as g_idx forces the second path, and the scales must be the same bits."""
    w = torch.randn(17, K, generator=torch.Generator().manual_seed(K)) * 3
    fmt = WeightFormat(bits=4, group_size=group_size, symmetric=symmetric)
    clip = torch.rand(17, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    natural = torch.arange(K) // group_size if group_size else torch.zeros(K, dtype=torch.long)
    for c in (None, clip):
        fast = compute_scales(w, fmt, c)
        scatter = compute_scales(w, fmt, c, g_idx=natural)
        assert torch.equal(fast[0], scatter[0])
        assert (fast[1] is None and scatter[1] is None) or torch.equal(fast[1], scatter[1])
