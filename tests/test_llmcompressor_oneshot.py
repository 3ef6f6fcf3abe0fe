"""Checkpoints written by llm-compressor's own ``oneshot`` on the CPU (issue 19, item 2): W4A16, W8A8
int8 and FP8 dynamic, saved compressed, loaded by lowbit.

llm-compressor 0.14.0.1 pins transformers <= 5.17 and compressed-tensors == 0.19, which this project
is past (5.24, 0.20.1); ``make install-dev`` installs it with ``--no-deps``, and its data-free schemes
run here as they are. The expected weights are the library's own decompression (transformers'
``CompressedTensorsConfig(run_compressed=False)``), in fp32.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("llmcompressor")
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import QuantizationModifier  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

from lowbit.model.loader import load_model  # noqa: E402
from tests.tiny_models import assert_layers_dequantize_to, make_hf_model, quantized_layers  # noqa: E402

SIZES = dict(hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    make_hf_model("llama2", **SIZES).save_pretrained(path)
    return path


@pytest.mark.parametrize("scheme, want", [
    ("W4A16", (4, "int", 128, None, "int")),
    ("W8A8", (8, "int", None, 8, "int")),
    ("FP8_DYNAMIC", (8, "fp8_e4m3", None, 8, "fp8_e4m3")),
])
def test_oneshot_checkpoints_load_to_the_librarys_decompressed_weights(float_dir, tmp_path, scheme, want):
    hf = AutoModelForCausalLM.from_pretrained(float_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oneshot(model=hf, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    out = tmp_path / scheme
    hf.save_pretrained(out, save_compressed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp32 scales rounded to fp16: counted and warned by the reader
        model = load_model(out, device="cpu", dtype="fp32", with_tokenizer=False).model
    w, a = model.quant_scheme.weights, model.quant_scheme.activations
    assert (w.bits, w.dtype, w.group_size, a.bits, a.dtype) == want
    ref = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(run_compressed=False))
    sd = ref.state_dict()
    layers = quantized_layers(model)
    assert len(layers) == 14
    assert_layers_dequantize_to(model, {n: sd[f"{n}.weight"].float() for n in layers}, atol=2**-20)
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()
