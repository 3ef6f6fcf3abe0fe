"""AutoAWQ checkpoints (GEMM packing) loaded into lowbit's layers (issue 19).

Fixtures are packed in the test by AutoAWQ's own code (``WQLinear_GEMM.from_linear``, what its
quantizer calls to save), from weights quantized the way its quantizer does (min-max per group, then
the pseudo-quantized weight handed to the packer); the expected weights are AutoAWQ's own
``dequantize_gemm``. Nothing of lowbit packs the fixtures.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

with warnings.catch_warnings():  # AutoAWQ announces its deprecation on import
    warnings.simplefilter("ignore")
    pytest.importorskip("awq")
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm
from safetensors.torch import save_file  # noqa: E402

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.model.loader import load_model  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    assert_layers_dequantize_to,
    assert_logits_match_dequantized,
    make_hf_model,
    quantized_layers,
)


def _pseudo_quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's zero-point quantization of (N, K) fp16 ``w``: (pseudo-quantized w, scales (N, G),
    zeros (N, G) int)."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo).clamp(min=1e-5) / 15)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.clamp(torch.round(wg / scales[..., None]) + zeros[..., None], 0, 15)
    return ((q - zeros[..., None]) * scales[..., None]).reshape(N, K).half(), scales.half(), zeros.int()


def write_awq(tmp_path, group: int = 64, version: str = "gemm"):
    hf = make_hf_model("llama2", hidden_size=128, intermediate_size=256)
    state, expected = {}, {}
    for name, t in hf.state_dict().items():
        module = name.removesuffix(".weight")
        if name.endswith("_proj.weight"):
            wq, scales, zeros = _pseudo_quantize(t.half(), group)
            linear = torch.nn.Linear(t.shape[1], t.shape[0], bias=False, dtype=torch.float16)
            linear.weight.data.copy_(wq)
            packed = WQLinear_GEMM.from_linear(linear, 4, group, scales=scales.t().contiguous(),
                                               zeros=zeros.t().contiguous())
            for part in ("qweight", "qzeros", "scales"):
                state[f"{module}.{part}"] = getattr(packed, part).contiguous()
            expected[module] = dequantize_gemm(packed.qweight, packed.qzeros, packed.scales, 4, group).t()
        else:
            state[name] = t.contiguous()
    out = tmp_path / "awq"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    config = hf.config.to_dict()
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                     "version": version}
    (out / "config.json").write_text(json.dumps(config))
    return out, expected


@pytest.mark.parametrize("group", [32, 64, 128])
def test_layers_hold_autoawqs_own_dequantized_weights(tmp_path, group):
    path, expected = write_awq(tmp_path, group)
    model = load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model
    w = model.quant_scheme.weights
    assert (w.bits, w.symmetric, w.group_size) == (4, False, group)
    assert len(quantized_layers(model)) == len(expected) == 14
    # (q - z) * s: ours in fp32 from the fp16 scale, AutoAWQ's in fp16
    assert_layers_dequantize_to(model, expected, atol=2**-24)


def test_logits_equal_autoawqs_dequantized_model_through_our_reference_forward(tmp_path):
    path, expected = write_awq(tmp_path, 64)
    ours = load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model
    hf = make_hf_model("llama2", hidden_size=128, intermediate_size=256)  # the same seed: the packed model
    assert_logits_match_dequantized(ours, hf, expected, tmp_path)


def test_versions_not_read_are_named(tmp_path):
    path, _ = write_awq(tmp_path, 64, version="gemv")
    with pytest.raises(LowbitError, match="AWQ version 'gemv' is not read"):
        load_model(path, device="cpu", dtype="fp32", with_tokenizer=False)
