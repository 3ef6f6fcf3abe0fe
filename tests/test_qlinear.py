"""QuantLinear's guards: what reaches a layer that cannot take it fails with a LowbitError, not an AttributeError."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, WeightFormat
from lowbit.kernels.activations import QuantizedActivations
from lowbit.model.qlinear import QuantLinear
from lowbit.quant.gptq import rtn_quantize


def _layer(N: int = 8, K: int = 16) -> QuantLinear:
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    qw = rtn_quantize(w, WeightFormat(group_size=None, method="rtn"))
    return QuantLinear.from_quantized(qw, ActivationFormat(bits=8), in_features=K, dtype=torch.float32)


def test_pre_quantized_activations_without_kernels_are_a_clear_error():
    layer = _layer()
    assert layer.kernel is None  # on the CPU prepare_kernels() never packs
    x = QuantizedActivations(q=torch.zeros(2, 16, dtype=torch.int8), scale=torch.ones(2), dtype=torch.float16)
    with pytest.raises(LowbitError, match="pre-quantized activations reached a layer without an 8-bit-activation"):
        layer(x)


def test_from_tensors_takes_what_from_quantized_made_and_names_bad_buffers():
    layer = _layer()
    buffers = {k: b for k, b in layer.named_buffers()}
    back = QuantLinear.from_tensors(buffers, 16, layer.wfmt, layer.afmt)
    assert back.out_features == 8 and torch.equal(back.qweight, layer.qweight)
    x = torch.randn(3, 16)
    torch.testing.assert_close(back(x), layer(x), rtol=0, atol=0)
    with pytest.raises(LowbitError, match=r"tensor 'scales' has shape \(8, 2\), expected \(8, 1\) for int4 weights, "
                                          "per-channel"):
        QuantLinear.from_tensors(dict(buffers, scales=buffers["scales"].repeat(1, 2)), 16, layer.wfmt, layer.afmt)
    with pytest.raises(LowbitError, match="tensor 'zeros' is unexpected for int4 weights"):
        QuantLinear.from_tensors(dict(buffers, zeros=torch.zeros(8, 1, dtype=torch.uint8)), 16, layer.wfmt, layer.afmt)
    with pytest.raises(LowbitError, match="tensor 'bogus' is not a quantized-layer tensor"):
        QuantLinear.from_tensors(dict(buffers, bogus=torch.zeros(1)), 16, layer.wfmt, layer.afmt)
