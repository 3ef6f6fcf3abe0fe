"""GPTQ checkpoints loaded into lowbit's layers (issue 19).

The fixtures are written by a maintained producer that runs on a CPU: Intel's AutoRound
(``quantize_and_save(format="auto_gptq")``, which writes ``quant_method: "gptq"`` checkpoints in the
v1 packing that GPTQModel, AutoGPTQ, transformers and vLLM read). GPTQModel itself cannot be
installed beside this project's torch (its 7.x releases require torch >= 2.14.1). The expected
weights are the producer's own dequantization: its ``QuantLinear.forward`` (the torch backend it
packs with) on an identity input. Nothing of lowbit packs the fixtures.

AutoRound does not write act-order (``desc_act``) checkpoints; the act-order case takes one of its
checkpoints and permutes ``g_idx`` (the only tensor act-order changes in the v1 layout), and the
expected weights come from the producer's forward, which reads ``g_idx``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

auto_round = pytest.importorskip("auto_round")
from auto_round_extension.torch.qlinear_torch_zp import QuantLinear  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lowbit.checkpoint.gptq import unpack_fields  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.model.loader import load_model  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    assert_layers_dequantize_to,
    assert_logits_match_dequantized,
    make_hf_model,
    quantized_layers,
    save_tiny_tokenizer,
)

SIZES = dict(hidden_size=128, intermediate_size=256)


def _hf_model():
    """The tiny llama, its float weights rounded to bf16 (what AutoRound saves unquantized tensors in)."""
    hf = make_hf_model("llama2", **SIZES)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    return hf


@pytest.fixture(scope="session")
def gptq_dir(tmp_path_factory):
    """(bits, sym, group) -> a checkpoint AutoRound wrote, built once per session."""
    made = {}

    def make(bits: int, sym: bool, group: int):
        key = (bits, sym, group)
        if key not in made:
            root = tmp_path_factory.mktemp(f"gptq-w{bits}-{'sym' if sym else 'asym'}-g{group}")
            save_tiny_tokenizer(root / "tok")
            from transformers import AutoTokenizer

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ar = auto_round.AutoRound(
                    _hf_model(), AutoTokenizer.from_pretrained(root / "tok"), bits=bits, group_size=group, sym=sym,
                    iters=0, nsamples=4, seqlen=32, dataset=[" ".join(f"w{3 + i % 90}" for i in range(64))] * 8,
                    device_map="cpu")
                ar.quantize_and_save(str(root / "out"), format="auto_gptq")
            out = next(p for p in (root / "out").iterdir() if (p / "config.json").exists())
            made[key] = out
        return made[key]

    return make


def _producer_weights(path, act_order: bool = False) -> dict[str, torch.Tensor]:
    """Each quantized layer's weight (N, K) as AutoRound's QuantLinear dequantizes it (fp32 arithmetic).

    ``act_order``: through its g_idx branch, which slices the scales along N to K columns (correct only
    for layers with N <= K: those are the ones returned)."""
    state = load_file(str(path / "model.safetensors"))
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    out = {}
    for key in state:
        if not key.endswith(".qweight"):
            continue
        prefix = key.removesuffix(".qweight")
        qw, scales = state[key], state[f"{prefix}.scales"]
        K, N = qw.shape[0] * 32 // qc["bits"], qw.shape[1]
        if act_order and N > K:
            continue
        lin = QuantLinear(qc["bits"], qc["group_size"], K, N, bias=False, g_idx=act_order)
        lin.qweight, lin.qzeros = qw, state[f"{prefix}.qzeros"]
        if act_order:
            lin.g_idx = state[f"{prefix}.g_idx"]
        lin.scales = scales.float()  # exact (q - zero) * scale
        with torch.no_grad():
            out[prefix] = lin(torch.eye(K)).t().contiguous()
    return out


@pytest.mark.parametrize("bits, sym, group", [(4, True, 64), (4, False, 32), (4, True, -1), (8, True, 128)])
def test_layers_hold_the_producers_dequantized_weights(gptq_dir, bits, sym, group):
    # (8-bit asymmetric GPTQ is refused by AutoRound itself: vLLM serves 8-bit GPTQ symmetric only)
    path = gptq_dir(bits, sym, group)
    model = load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model
    w = model.quant_scheme.weights
    assert (w.bits, w.symmetric, w.group_size) == (bits, sym, None if group == -1 else group)
    expected = _producer_weights(path)
    assert len(quantized_layers(model)) == len(expected) == 14
    assert_layers_dequantize_to(model, expected, atol=0)
    # no act-order: the trivial g_idx is dropped, so the kernels take the layers
    assert all(m.g_idx is None for m in quantized_layers(model).values())


def test_logits_equal_the_producers_dequantized_model(gptq_dir, tmp_path):
    path = gptq_dir(4, False, 32)
    ours = load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model
    assert_logits_match_dequantized(ours, _hf_model(), _producer_weights(path), tmp_path)


def _copy_with(path, tmp_path, state_edit=None, config_edit=None):
    out = tmp_path / "edited"
    out.mkdir()
    state = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    if state_edit:
        state_edit(state)
    if config_edit:
        config_edit(config["quantization_config"])
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_act_order_g_idx_is_read(gptq_dir, tmp_path):
    path = gptq_dir(4, False, 32)

    def permute(state):
        gen = torch.Generator().manual_seed(0)
        for key in [k for k in state if k.endswith(".g_idx")]:
            g = state[key]
            state[key] = g[torch.randperm(g.numel(), generator=gen)].contiguous()

    out = _copy_with(path, tmp_path, permute, lambda qc: qc.update(desc_act=True))
    model = load_model(out, device="cpu", dtype="fp32", with_tokenizer=False).model
    assert model.quant_scheme.weights.act_order
    assert all(m.g_idx is not None for m in quantized_layers(model).values())
    expected = _producer_weights(out, act_order=True)
    assert len(expected) == 10  # q, k, v, o, down of both layers (module docstring of _producer_weights)
    assert_layers_dequantize_to(model, expected, atol=0)


def test_a_permuted_g_idx_without_desc_act_is_an_error(gptq_dir, tmp_path):
    path = gptq_dir(4, False, 32)

    def swap(state):
        key = next(k for k in state if k.endswith(".g_idx"))
        state[key] = state[key].flip(0).contiguous()

    out = _copy_with(path, tmp_path, swap)
    with pytest.raises(LowbitError, match="desc_act is false"):
        load_model(out, device="cpu", dtype="fp32", with_tokenizer=False)


@pytest.mark.parametrize("edit, needle", [
    (lambda qc: qc.update(bits=3), "3-bit weights is not read"),
    (lambda qc: qc.update(checkpoint_format="marlin"), "format 'marlin' is not read"),
    (lambda qc: qc.update(group_size=48), "GPTQ group size 48"),
])
def test_what_is_not_read_is_named(gptq_dir, tmp_path, edit, needle):
    out = _copy_with(gptq_dir(4, True, 64), tmp_path, config_edit=edit)
    with pytest.raises(LowbitError, match=needle):
        load_model(out, device="cpu", dtype="fp32", with_tokenizer=False)


def test_sym_checkpoint_with_other_zero_points_is_an_error(gptq_dir, tmp_path):
    out = _copy_with(gptq_dir(4, False, 32), tmp_path, config_edit=lambda qc: qc.update(sym=True))
    with pytest.raises(LowbitError, match="marked sym"):
        load_model(out, device="cpu", dtype="fp32", with_tokenizer=False)


def test_v2_zero_points_are_stored_as_they_are():
    # gptq_v2 keeps the zero itself: the same word read as v1 is one higher
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_fields(word, 4).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    assert unpack_fields(torch.tensor([[-1]], dtype=torch.int32), 8).tolist() == [[255, 255, 255, 255]]


def test_a_gptq_config_over_other_tensors_is_named(gptq_dir, tmp_path):
    def drop_zeros(state):
        for key in [k for k in state if k.endswith(".qzeros")]:
            del state[key]

    out = _copy_with(gptq_dir(4, True, 64), tmp_path, drop_zeros)
    with pytest.raises(LowbitError, match="no tensor is a GPTQ layer's qzeros"):
        load_model(out, device="cpu", dtype="fp32", with_tokenizer=False)
