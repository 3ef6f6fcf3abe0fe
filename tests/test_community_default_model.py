"""Other tools' checkpoints of the default model (smollm2-135m), as issue 19 asks: perplexity on the eval
split and greedy tokens against the producer's own dequantized weights through our reference forward.

Each checkpoint is packed by its producer's code (compressed-tensors' ``PackedQuantizationCompressor``,
AutoAWQ's ``WQLinear_GEMM.from_linear``, AutoRound's GPTQ ``QuantLinear.pack``), from min-max scales per
group of 64. The reference model
is the same float model with every decoder Linear replaced by the producer's own dequantization of
what it packed, computed in fp32 (the producers' functions take the scales' dtype; fp32 makes each
(q - zero) * scale exact, so the reference is the producer's arithmetic without an fp16 rounding).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("compressed_tensors")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("awq")
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm
pytest.importorskip("auto_round")
from auto_round_extension.torch.qlinear_torch_zp import QuantLinear as GptqLinear  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lowbit.checkpoint.native import hf_name  # noqa: E402
from lowbit.engine.reference import reference_generate  # noqa: E402
from lowbit.engine.sampling import SamplingParams  # noqa: E402
from lowbit.eval.perplexity import evaluation_windows, perplexity  # noqa: E402
from lowbit.model.loader import load_model  # noqa: E402
from tests.test_awq import _pseudo_quantize  # noqa: E402
from tests.test_compressed_tensors import _qparams  # noqa: E402

pytestmark = pytest.mark.asset
GROUP = 64  # smollm2-135m: hidden 576 = 9 x 64, intermediate 1536 = 24 x 64


def _pack_ct(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=GROUP)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    scale, zp = _qparams(w.float(), False, GROUP)
    own = dict(PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                     scheme))
    codes = unpack_from_int32(own["weight_packed"], 4, w.shape)
    zeros = unpack_from_int32(own["weight_zero_point"], 4, scale.shape, packed_dim=0)
    ref = dequantize(codes, own["weight_scale"].float(), zeros, args)  # the library's, in fp32
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized", ignore=["lm_head"])
    return own, ref, qc.model_dump(mode="json", exclude_none=True)


def _pack_awq(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    wq, scales, zeros = _pseudo_quantize(w, GROUP)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float16)
    linear.weight.data.copy_(wq)
    p = WQLinear_GEMM.from_linear(linear, 4, GROUP, scales=scales.t().contiguous(), zeros=zeros.t().contiguous())
    own = {k: getattr(p, k).contiguous() for k in ("qweight", "qzeros", "scales")}
    ref = dequantize_gemm(p.qweight, p.qzeros, p.scales.float(), 4, GROUP).t()  # AutoAWQ's, in fp32
    return own, ref, {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}


def _pack_gptq(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    _, scales, zeros = _pseudo_quantize(w, GROUP)
    N, K = w.shape
    linear = torch.nn.Linear(K, N, bias=False, dtype=torch.float16)
    linear.weight.data.copy_(w)
    p = GptqLinear(4, GROUP, K, N, bias=False, g_idx=True)
    p.pack(linear, scales, zeros, g_idx=p.g_idx, device="cpu")
    own = {k: getattr(p, k).contiguous() for k in ("qweight", "qzeros", "scales", "g_idx")}
    ref_layer = GptqLinear(4, GROUP, K, N, bias=False)  # its forward without g_idx: repeat per group
    ref_layer.qweight, ref_layer.qzeros, ref_layer.scales = p.qweight, p.qzeros, p.scales.float()
    with torch.no_grad():
        ref = ref_layer(torch.eye(K)).t().contiguous()  # AutoRound's dequantization, in fp32
    return own, ref, {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": False, "desc_act": False,
                      "checkpoint_format": "gptq"}


@pytest.fixture(scope="module")
def base():
    return load_model("smollm2-135m", device="cpu", dtype="fp32")


@pytest.mark.parametrize("producer", ["compressed-tensors", "awq", "gptq"])
def test_perplexity_and_greedy_tokens_match_the_producers_dequantized_model(base, producer, tmp_path):
    pack = {"compressed-tensors": _pack_ct, "awq": _pack_awq, "gptq": _pack_gptq}[producer]
    state, refs = {}, {}
    qconfig = None
    for name, t in base.model.state_dict().items():
        key = hf_name(name)
        if name.startswith("layers.") and name.endswith("_proj.weight"):
            own, ref, qconfig = pack(t.half())
            module = key.removesuffix(".weight")
            state.update({f"{module}.{k}": v for k, v in own.items()})
            refs[name] = ref
        elif key != "lm_head.weight" or not base.config.tie_word_embeddings:
            state[key] = t.half().contiguous()
    out = tmp_path / producer
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    config = {**base.model.config.to_hf(), "torch_dtype": "float16", "quantization_config": qconfig}
    (out / "config.json").write_text(json.dumps(config))
    base.tokenizer.save_pretrained(out)

    ours = load_model(out, device="cpu", dtype="fp32")
    reference = load_model("smollm2-135m", device="cpu", dtype="fp32")
    with torch.no_grad():
        sd = reference.model.state_dict()
        for name, ref in refs.items():
            sd[name].copy_(ref)
        for name, t in sd.items():  # the float tensors as the checkpoint holds them (fp16)
            if name not in refs and t.is_floating_point() and "rotary" not in name:
                t.copy_(t.half().float())
    chunks = evaluation_windows(base, "wiki", seq_len=512, max_chunks=4)
    with torch.no_grad():
        got = perplexity(ours.model, chunks, batch_size=2, progress=False).ppl
        want = perplexity(reference.model, chunks, batch_size=2, progress=False).ppl
    print(f"{producer}: ppl ours {got:.4f}, producer-dequantized {want:.4f}")
    assert abs(got / want - 1) < 0.005
    prompt = base.tokenizer("The capital of France is").input_ids
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    tokens = lambda m: [c.token_ids for c in reference_generate(m, [prompt], greedy)]  # noqa: E731
    assert tokens(ours.model) == tokens(reference.model)
