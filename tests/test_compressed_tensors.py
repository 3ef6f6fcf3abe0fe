"""compressed-tensors W4A16 checkpoints (issue 19, first format): loaded into lowbit's layers.

Fixtures are made in the test by the ``compressed-tensors`` library's own packing code
(``PackedQuantizationCompressor.compress``, what llm-compressor calls to save), never by ours; the
expected weights are the library's own ``decompress``. The scales here are any valid ones (absmax
and min-max per group), since what is tested is the format, not the quantizer.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.model.loader import load_model  # noqa: E402
from lowbit.model.qlinear import QuantLinear  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    assert_layers_dequantize_to,
    assert_logits_match_dequantized,
    make_hf_model,
    quantized_layers,
)


def _qparams(w: torch.Tensor, symmetric: bool, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scales and int8 zero points (N, G) for int4 in [-8, 7]: q = round(w / s) + zp."""
    N, K = w.shape
    g = group or K
    wg = w.reshape(N, K // g, g)
    if symmetric:
        scale = wg.abs().amax(-1) / 7.5
        zp = torch.zeros_like(scale, dtype=torch.int8)
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = (hi - lo) / 15
        zp = (torch.round(-lo / scale) - 8).clamp(-8, 7).to(torch.int8)
    return scale.clamp_min(1e-6).half(), zp


_EIGHT = {"int-quantized": ("int", 127.0), "float-quantized": ("float", 448.0)}


def write_checkpoint(tmp_path, symmetric: bool = True, group: int | None = None, *, fmt: str = "pack-quantized",
                     scale_dtype: torch.dtype = torch.float16, per_tensor: bool = False, act: str | None = None):
    """A tiny Llama in compressed-tensors (every decoder Linear) in ``fmt``: W4A16 for pack-quantized,
    W8A8 with dynamic per-token activations for int-/float-quantized; and the library's own
    dequantized weights of each layer: {hf name: (N, K)}."""
    hf = make_hf_model("llama2", hidden_size=128, intermediate_size=256)
    if fmt in _EIGHT:
        kind, qmax = _EIGHT[fmt]
        args = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="tensor" if per_tensor else "channel")
        acts = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True)
        scheme, compressor = QuantizationScheme(targets=["Linear"], weights=args, input_activations=acts), \
            NaiveQuantizationCompressor
    else:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric,
                                strategy="group" if group else "channel", group_size=group)
        acts = None if act is None else QuantizationArgs(num_bits=8, type=act, symmetric=True, strategy="token",
                                                         dynamic=True)
        scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=acts)
        compressor = PackedQuantizationCompressor
    state, expected = {}, {}
    for name, t in hf.state_dict().items():
        module = name.removesuffix(".weight")
        if name.endswith("_proj.weight"):
            w = t.half()
            if fmt in _EIGHT:
                amax = w.float().abs().amax() if per_tensor else w.float().abs().amax(1, keepdim=True)
                own = {"weight": w, "weight_scale": (amax / qmax).to(scale_dtype).reshape(-1 if per_tensor else w.shape[0],
                                                                                        *(() if per_tensor else (1,)))}
            else:
                scale, zp = _qparams(w.float(), symmetric, group)
                own = {"weight": w, "weight_scale": scale.to(scale_dtype), "weight_zero_point": zp}
            own = compressor.compress(own, scheme)
            expected[module] = compressor.decompress(dict(own), scheme)["weight"]
            state.update({f"{module}.{k}": v.contiguous() for k, v in own.items()})
        else:
            state[name] = t.contiguous()
    out = tmp_path / "ct"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    config = hf.config.to_dict()
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head"])
    config["quantization_config"] = qc.model_dump(mode="json", exclude_none=True)
    (out / "config.json").write_text(json.dumps(config))
    return out, expected, hf


@pytest.mark.parametrize("symmetric, group", [(True, 32), (False, 64), (True, None), (False, None), (True, 128)])
def test_layers_hold_the_librarys_own_dequantized_weights(tmp_path, symmetric, group):
    path, expected, _ = write_checkpoint(tmp_path, symmetric, group)
    model = load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model
    assert model.quant_scheme.weights.group_size == group and model.quant_scheme.weights.symmetric == symmetric
    assert len(quantized_layers(model)) == len(expected) == 2 * 7 and not isinstance(model.lm_head, QuantLinear)
    # (q - zp) * s: ours in fp32 from the fp16 scale, the library's rounded to fp16
    assert_layers_dequantize_to(model, expected, atol=0)


@pytest.mark.parametrize("act, dtype", [("int", "int"), ("float", "fp8_e4m3")])
def test_w4a8_checkpoints_read_as_lowbits_8_bit_activation_layers(tmp_path, act, dtype):
    path, expected, _ = write_checkpoint(tmp_path, False, 128, act=act)
    model = load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model
    w, a = model.quant_scheme.for_layer("layers.0.self_attn.q_proj")
    assert (w.bits, w.group_size, w.symmetric, a.bits, a.dtype) == (4, 128, False, 8, dtype)
    assert_layers_dequantize_to(model, expected, atol=2**-24)


def test_logits_equal_the_library_dequantized_model_through_our_reference_forward(tmp_path):
    path, expected, hf = write_checkpoint(tmp_path, False, 64)
    ours = load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model
    assert_logits_match_dequantized(ours, hf, expected, tmp_path)


@pytest.mark.parametrize("fmt, per_tensor, scale_dtype", [("int-quantized", False, torch.float16),
                                                          ("float-quantized", False, torch.float16),
                                                          ("float-quantized", True, torch.float32)])
def test_8bit_layers_keep_their_codes_and_the_librarys_scales(tmp_path, fmt, per_tensor, scale_dtype):
    path, expected, _ = write_checkpoint(tmp_path, fmt=fmt, scale_dtype=scale_dtype, per_tensor=per_tensor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model
    dtype = "int" if fmt == "int-quantized" else "fp8_e4m3"
    w, a = model.quant_scheme.for_layer("layers.0.mlp.down_proj")
    assert (w.bits, w.dtype, w.group_size, a.bits, a.dtype) == (8, dtype, None, 8, dtype)
    # fp32 scales are rounded to fp16 (what the kernels read), and the load says so
    assert any("not exact in fp16" in str(c.message) for c in caught) == (scale_dtype == torch.float32)
    layers = quantized_layers(model)
    assert len(layers) == len(expected) == 14
    assert all(layers[n].qweight.dtype == (torch.int8 if dtype == "int" else torch.float8_e4m3fn) for n in expected)
    # the library rounds each product to fp16, subnormals (below 2^-14) included: one fp16 step apart
    assert_layers_dequantize_to(model, expected, atol=2**-24)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 97, (1, 9)))).all()


def test_formats_not_read_yet_are_named(tmp_path):
    path, _, _ = write_checkpoint(tmp_path, True, 32, fmt="naive-quantized")
    with pytest.raises(LowbitError, match="format 'naive-quantized' is not read yet"):
        load_model(path, device="cpu", dtype="fp32", with_tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                                  "dynamic": False}  # static activation scales
    config["quantization_config"]["format"] = "pack-quantized"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="quantizes activations to 8 bits per token at run time"):
        load_model(path, device="cpu", dtype="fp32", with_tokenizer=False)


def test_other_tools_checkpoints_get_an_error_that_names_their_method(tmp_path):
    path, _, _ = write_checkpoint(tmp_path, True, 32)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hqq", "bits": 4, "group_size": 128}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="quantized with .hqq.*GPTQ, AutoAWQ"):
        load_model(path, device="cpu", dtype="fp32", with_tokenizer=False)


# ---- export: lowbit -> compressed-tensors ---------------------------------------------------------

def _lowbit_model(scheme, tmp_path):
    """The tiny Llama in fp16, quantized by round-to-nearest in ``scheme`` (lowbit's own layers)."""
    from lowbit.bench.synthetic import quantize_rtn

    make_hf_model("llama2", hidden_size=128, intermediate_size=256).save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", device="cpu", dtype="fp16", with_tokenizer=False).model
    return quantize_rtn(model, scheme, progress=False)


def _exportable():
    from lowbit.formats import ActivationFormat, QuantScheme, WeightFormat, get_scheme

    return {
        "w4a16-rtn": get_scheme("w4a16-rtn"),  # int4 symmetric, group 128
        "int4-asym-g64": QuantScheme("int4-asym-g64", WeightFormat(symmetric=False, group_size=64, method="rtn")),
        "int4-channel": QuantScheme("int4-channel", WeightFormat(group_size=None, method="rtn")),
        "w8a8-int8-plain": QuantScheme("w8a8-int8-plain", WeightFormat(bits=8, group_size=None, method="rtn"),
                                       ActivationFormat(bits=8)),
        "w8a8-fp8": get_scheme("w8a8-fp8"),
        "w4a8-plain": QuantScheme("w4a8-plain", WeightFormat(group_size=None, method="rtn"), ActivationFormat(bits=8)),
        "w4a8-fp8-g128": QuantScheme("w4a8-fp8-g128", WeightFormat(method="rtn"),
                                     ActivationFormat(bits=8, dtype="fp8_e4m3")),
    }


@pytest.mark.parametrize("name", ["w4a16-rtn", "int4-asym-g64", "int4-channel", "w8a8-int8-plain", "w8a8-fp8",
                                  "w4a8-plain", "w4a8-fp8-g128"])
def test_export_round_trips_through_the_library_bit_for_bit(tmp_path, name):
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor as Naive
    from safetensors.torch import load_file

    from lowbit.model.compressed_tensors_export import save_compressed_tensors

    model = _lowbit_model(_exportable()[name], tmp_path)
    out = save_compressed_tensors(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    # what vLLM reads to pick its compressed-tensors scheme
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    assert qc["format"] in ("pack-quantized", "int-quantized", "float-quantized")
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    compressor = PackedQuantizationCompressor if qc["format"] == "pack-quantized" else Naive
    tensors = load_file(out / "model.safetensors")
    for prefix, m in quantized_layers(model).items():
        own = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
        w = compressor.decompress(own, scheme)["weight"]
        # the library's fp16 dequantization of our codes and scales, bit for bit
        assert w.dtype == torch.float16 and torch.equal(w, m.dequantized_weight().half()), prefix
    # and lowbit reads it back to the same layers: identical logits
    back = load_model(out, device="cpu", dtype="fp16", with_tokenizer=False).model
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_export_names_what_it_cannot_write(tmp_path):
    from lowbit.formats import get_scheme
    from lowbit.model.compressed_tensors_export import save_compressed_tensors

    with pytest.raises(LowbitError, match="no compressed-tensors form lowbit writes"):
        save_compressed_tensors(_lowbit_model(get_scheme("w4a4"), tmp_path / "1"), tmp_path / "a")
    with pytest.raises(LowbitError, match="SmoothQuant factors"):
        save_compressed_tensors(_lowbit_model(get_scheme("w8a8-int8"), tmp_path / "2"), tmp_path / "b")
    with pytest.raises(LowbitError, match="KV cache"):
        save_compressed_tensors(_lowbit_model(get_scheme("w4a16-rtn+kv8"), tmp_path / "3"), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_export_writes_compressed_tensors_and_refuses_an_existing_output(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.formats import get_scheme
    from lowbit.model.native_checkpoint import save_quantized

    model = _lowbit_model(get_scheme("w4a16-rtn"), tmp_path)
    save_quantized(model, tmp_path / "native")
    assert main(["export", str(tmp_path / "native"), "-o", str(tmp_path / "ct")]) in (0, None)
    assert "wrote" in capsys.readouterr().out
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized" and config["torch_dtype"] == "float16"
    back = load_model(tmp_path / "ct", device="cpu", dtype="fp16", with_tokenizer=False).model
    ids = torch.randint(3, 97, (1, 7))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    assert main(["export", str(tmp_path / "native"), "-o", str(tmp_path / "ct")]) == 2
    assert "already exists" in capsys.readouterr().err
