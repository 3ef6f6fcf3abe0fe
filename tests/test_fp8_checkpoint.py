"""Plain FP8 checkpoints (``quant_method: "fp8"``) loaded into lowbit's layers (issue 19).

The fixtures are quantized by transformers' own FP8 code path (``integrations.finegrained_fp8.Fp8Quantize``,
the op its ``FineGrainedFP8`` quantizer runs on each weight; the quantizer itself refuses to start
without a GPU), with the ``quantization_config`` its ``FineGrainedFP8Config`` writes. The expected
weights are its own ``Fp8Dequantize``. Nothing of lowbit packs the fixtures.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat
from lowbit.model.loader import load_model
from lowbit.numerics.primitives import fake_quantize_activation
from tests.tiny_models import assert_layers_dequantize_to, make_hf_model, quantized_layers

SIZES = dict(hidden_size=128, intermediate_size=256)


def write_fp8(tmp_path, block, activation_scheme="dynamic"):
    hf = make_hf_model("llama2", **SIZES)
    qconfig = FineGrainedFP8Config(weight_block_size=block, activation_scheme=activation_scheme)
    producer = SimpleNamespace(quantization_config=qconfig)
    quantize, dequantize = Fp8Quantize(producer), Fp8Dequantize(producer)
    state, expected = {}, {}
    for name, t in hf.state_dict().items():
        if name.endswith("_proj.weight"):
            own = quantize._quantize_one(name, t.float())
            state.update({k: v.contiguous() for k, v in own.items()})
            scale = own[name.removesuffix(".weight") + ".weight_scale_inv"]
            expected[name.removesuffix(".weight")] = dequantize._dequantize_one(own[name], scale, torch.float32)
        else:
            state[name] = t.contiguous()
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    config = hf.config.to_dict()
    config["quantization_config"] = qconfig.to_dict()
    (out / "config.json").write_text(json.dumps(config))
    return out, expected


@pytest.mark.parametrize("block, group", [([128, 128], 128), ([32, 64], 64), (None, None)])
def test_layers_hold_transformers_own_dequantized_weights(tmp_path, block, group):
    path, expected = write_fp8(tmp_path, block)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    model = load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model
    w, a = model.quant_scheme.weights, model.quant_scheme.activations
    assert (w.dtype, w.group_size, a.bits, a.dtype) == ("fp8_e4m3", group, 8, "fp8_e4m3")
    assert len(quantized_layers(model)) == len(expected) == 14
    # the producer's scales are fp32; lowbit holds them in fp16 (one rounding of the scale)
    assert_layers_dequantize_to(model, expected, atol=2**-14)


def test_logits_equal_transformers_dequantized_model_with_fp8_activations(tmp_path):
    # the reference: transformers' model with each Linear's weight as read (the producer's dequantized
    # weight with its scale in fp16: equal to it to that rounding, test above; fp8 activations turn any
    # smaller difference into whole rounding steps), each Linear's input rounded to fp8 per token the
    # way lowbit's scheme says (forward pre-hooks), in fp32
    path, expected = write_fp8(tmp_path, [128, 128])
    with pytest.warns(UserWarning, match="not exact in fp16"):
        ours = load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model
    hf = make_hf_model("llama2", **SIZES)
    afmt = ActivationFormat(bits=8, dtype="fp8_e4m3")
    with torch.no_grad():
        sd = hf.state_dict()
        layers = quantized_layers(ours)
        for name in expected:
            sd[f"{name}.weight"].copy_(layers[name].dequantized_weight())
            hf.get_submodule(name).register_forward_pre_hook(
                lambda m, args: (fake_quantize_activation(args[0].float(), afmt),))
        ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(0))
        got, want = ours(ids), hf(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 2e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_static_activation_scales_are_named(tmp_path):
    path, _ = write_fp8(tmp_path, [128, 128], activation_scheme="static")
    with pytest.raises(LowbitError, match="activation_scheme 'static' are not read"):
        load_model(path, device="cpu", dtype="fp32", with_tokenizer=False)


def test_block_columns_lowbit_has_no_group_for_are_named(tmp_path):
    path, _ = write_fp8(tmp_path, [128, 16])
    with pytest.raises(LowbitError, match="blocks of 16 columns are not read"):
        load_model(path, device="cpu", dtype="fp32", with_tokenizer=False)
