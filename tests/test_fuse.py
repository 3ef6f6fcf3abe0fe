"""Projection fusion (q/k/v and gate/up in one GEMM): the fused model computes what the separate
projections compute, for float and calibrated quantized models; formats that cannot merge stay apart."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.model.fuse import concat_linears, fuse_projections
from lowbit.model.loader import load_model
from lowbit.model.qlinear import QuantLinear
from tests.tiny_models import make_hf_model


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    make_hf_model("llama-bias", hidden_size=128, intermediate_size=256).save_pretrained(path)
    return path


def _ids():
    return torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme", [None, "w4a16", "w4a8", "w8a8-int8", "w4a8-g128"])
def test_fused_model_computes_the_same_logits(float_dir, scheme):
    loaded = load_model(float_dir, device="cpu", dtype="fp32", with_tokenizer=False)
    model = loaded.model
    if scheme is not None:
        calib = torch.randint(3, 97, (8, 32), generator=torch.Generator().manual_seed(0))
        model = lowbit.quantize(loaded, scheme, calib, progress=False)
    with torch.no_grad():
        before = model(_ids())
        n = fuse_projections(model)
        after = model(_ids())
    assert n == 2 * len(model.layers)  # calibrated q/k/v share their smoothing factors, so all merge
    attn = model.layers[0].self_attn
    assert attn.q_proj is None and attn.qkv_proj is not None and model.layers[0].mlp.gate_proj is None
    if scheme is not None:
        assert isinstance(attn.qkv_proj, QuantLinear) and attn.qkv_proj.bias is not None  # llama-bias: qkv bias
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert fuse_projections(model) == 0  # idempotent


def test_layers_that_cannot_merge_stay_apart():
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, bias=False)
    assert concat_linears([a, b]) is None  # one bias, not the other
    q = QuantLinear(8, 4, lowbit.formats.WeightFormat(), lowbit.formats.ActivationFormat())
    assert concat_linears([a, q]) is None
    r = QuantLinear(8, 4, lowbit.formats.WeightFormat(group_size=None), lowbit.formats.ActivationFormat())
    assert QuantLinear.concat([q, r]) is None  # different formats
