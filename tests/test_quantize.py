"""Every preset end to end on a tiny random model: quantize, generate, save, load back bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.model.native_checkpoint import save_quantized
from lowbit.engine.generate import generate
from lowbit.engine.sampling import SamplingParams
from lowbit.errors import LowbitError
from lowbit.formats import PRESETS, get_scheme
from lowbit.model.loader import load_model
from lowbit.model.qlinear import QuantLinear
from tests.tiny_models import make_hf_model

SCHEMES = sorted(PRESETS) + ["w4a8+kv4", "w4a16+kvfp8", "w8a8-int8+kv8"]


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    make_hf_model("llama-bias", hidden_size=128, intermediate_size=256).save_pretrained(path)
    return path


def _calib(vocab: int = 97) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (8, 32), generator=g)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_preset_quantizes_generates_and_round_trips(scheme, float_dir, tmp_path):
    loaded = load_model(float_dir, device="cpu", dtype="fp32", with_tokenizer=False)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        ref = loaded.model(ids)
    model = lowbit.quantize(loaded, scheme, _calib(), progress=False)
    qlinears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qlinears) == 7 * model.config.num_layers
    with torch.no_grad():
        logits = model(ids)
    assert torch.isfinite(logits).all()
    rel = ((logits - ref).norm() / ref.norm()).item()
    # quantized, so not identical, but still the same function; pruning half of a random matrix
    # (no redundancy to exploit, unlike trained weights) costs far more than 4-bit rounding
    assert 0 < rel < (0.9 if "2:4" in scheme else 0.5), rel
    out = generate(model, [ids[0].tolist()], SamplingParams(max_new_tokens=5))[0]
    assert len(out.token_ids) == 5

    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["scheme"]["name"] == get_scheme(scheme).name
    back = lowbit.load(tmp_path / "q", device="cpu", dtype="fp32", with_tokenizer=False).model
    saved, restored = model.state_dict(), back.state_dict()
    assert saved.keys() == restored.keys()
    for k in saved:
        assert saved[k].dtype == restored[k].dtype, k
        assert torch.equal(saved[k].view(torch.uint8) if saved[k].dtype == torch.float8_e4m3fn else saved[k],
                           restored[k].view(torch.uint8) if restored[k].dtype == torch.float8_e4m3fn else restored[k]), k
    with torch.no_grad():
        assert torch.equal(back(ids), logits)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scheme", ["w4a8+head", "w4a16+kv8+head"])
def test_quantized_head_untied_saved_and_loaded(scheme, tied, tmp_path):
    """+head: the lm_head becomes a QuantLinear (a tied one untied first, the embedding kept float),
    smoothing folds into the final norm, and the checkpoint round-trips."""
    path = tmp_path / "float"
    make_hf_model("llama3", tie_word_embeddings=tied, hidden_size=128, intermediate_size=256).save_pretrained(path)
    loaded = load_model(path, device="cpu", dtype="fp32", with_tokenizer=False)
    emb = loaded.model.embed_tokens.weight.detach().clone()
    norm = loaded.model.norm.weight.detach().clone()
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        ref = loaded.model(ids)
    plain = lowbit.quantize(load_model(path, device="cpu", dtype="fp32", with_tokenizer=False),
                            scheme.removesuffix("+head"), _calib(), progress=False)
    model = lowbit.quantize(loaded, scheme, _calib(), progress=False)
    assert model.quant_scheme.lm_head and isinstance(model.lm_head, QuantLinear)
    assert not isinstance(plain.lm_head, QuantLinear)
    assert torch.equal(model.embed_tokens.weight, emb)
    # w4a8 smooths (SmoothQuant): the head's factors are folded into the final norm
    assert torch.equal(model.norm.weight, norm) != get_scheme(scheme).smooth
    with torch.no_grad():
        logits, logits_plain = model(ids), plain(ids)
    rel = ((logits - ref).norm() / ref.norm()).item()
    assert ((logits_plain - ref).norm() / ref.norm()).item() < rel < 0.5
    save_quantized(model, tmp_path / "q")
    back = lowbit.load(tmp_path / "q", device="cpu", dtype="fp32", with_tokenizer=False).model
    assert back.quant_scheme == model.quant_scheme and isinstance(back.lm_head, QuantLinear)
    assert torch.equal(back.embed_tokens.weight, emb)
    with torch.no_grad():
        assert torch.equal(back(ids), logits)


def test_head_modifier_parses_and_old_configs_read_without_it():
    s = get_scheme("w4a8+kv4+head")
    assert s.lm_head and s.kv_cache.dtype == "int4" and s.name == "w4a8+kv4+head"
    assert not get_scheme("w4a8").lm_head
    d = s.to_dict()
    assert type(s).from_dict(d) == s
    d.pop("lm_head")
    assert not type(s).from_dict(d).lm_head  # a checkpoint written before the option
    with pytest.raises(LowbitError, match=r"\+head"):
        get_scheme("w4a8+heads")


def test_save_refuses_existing_dir_and_leaves_nothing_partial(float_dir, tmp_path, monkeypatch):
    loaded = load_model(float_dir, device="cpu", dtype="fp32", with_tokenizer=False)
    model = lowbit.quantize(loaded, "w4a16-rtn", _calib(), progress=False)
    (tmp_path / "q").mkdir()
    with pytest.raises(LowbitError, match="already exists.*--overwrite"):
        save_quantized(model, tmp_path / "q")
    import lowbit.checkpoint.native as native

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / "q", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # old dir intact, no temp dir left
    monkeypatch.undo()
    save_quantized(model, tmp_path / "q", overwrite=True)
    assert (tmp_path / "q" / "model.safetensors").is_file()


def test_quantize_errors(float_dir):
    loaded = load_model(float_dir, device="cpu", dtype="fp32", with_tokenizer=False)
    with pytest.raises(LowbitError, match="unknown scheme 'w3a3'.*w4a16"):
        lowbit.quantize(loaded, "w3a3", _calib())
    with pytest.raises(LowbitError, match="modifier"):
        lowbit.quantize(loaded, "w4a16+kv2", _calib())
    with pytest.raises(LowbitError, match="too short"):
        lowbit.quantize(loaded, "w4a16", torch.arange(10))
    with torch.no_grad():
        loaded.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="NaN/Inf"):
        lowbit.quantize(loaded, "w4a16", _calib())


def test_nan_activations_during_calibration(float_dir):
    loaded = load_model(float_dir, device="cpu", dtype="fp32", with_tokenizer=False)
    with torch.no_grad():
        # finite weights whose attention output overflows fp32 (calibration computes an fp32 model in
        # float64, where it stays finite, but the quantized fp32 model would hold inf there)
        loaded.model.layers[0].input_layernorm.weight.fill_(1e25)
        loaded.model.layers[0].self_attn.v_proj.weight.mul_(1e20)
    # the values overflow inside attention, so o_proj's input is the first to hold Inf; the message
    # names that layer and says what to try (fp32 only where the model is not already in it)
    with pytest.raises(LowbitError, match=r"entering layers\.0\.self_attn\.o_proj during calibration; "
                                          r"check that the checkpoint's weights are sane.*--calib"):
        lowbit.quantize(loaded, "w4a16", _calib())
    half = load_model(float_dir, device="cpu", dtype="bf16", with_tokenizer=False)
    with torch.no_grad():
        half.model.layers[1].input_layernorm.weight.fill_(1e30)  # inf in bf16's range once squared in q.k
    with pytest.raises(LowbitError, match=r"entering layers\.1\.self_attn\.o_proj .*quantize in fp32 \(--dtype fp32\)"):
        lowbit.quantize(half, "w4a16-rtn", _calib())


def test_unfactorable_hessian_warns_naming_the_layer_and_falls_back(float_dir, monkeypatch):
    """Every Cholesky attempt failing (as on degenerate calibration data): each input group (q/k/v,
    o, gate/up, down: quantized together) warns with its layers' names and the remedy, and is still
    quantized, round-to-nearest."""
    import lowbit.quant.gptq as gptq

    def failing_cholesky(A, *, upper=False):  # noqa: ANN001, N803
        return torch.zeros_like(A), torch.ones((), dtype=torch.int32)

    monkeypatch.setattr(gptq.torch.linalg, "cholesky_ex", failing_cholesky)
    loaded = load_model(float_dir, device="cpu", dtype="fp32", with_tokenizer=False)
    with pytest.warns(RuntimeWarning) as record:
        model = lowbit.quantize(loaded, "w4a16", _calib(), progress=False)
    fallbacks = [str(r.message) for r in record if "round-to-nearest" in str(r.message)]
    assert len(fallbacks) == 4 * model.config.num_layers
    assert "Hessian of layers.1.mlp.down_proj failed" in fallbacks[-1]
    assert "raise --samples" in fallbacks[-1]
    assert any("Hessian of layers.0.self_attn.q_proj+k_proj+v_proj failed (damp=0.01); retrying" in str(r.message)
               for r in record)
    assert any("Hessian of layers.1.mlp.gate_proj+up_proj failed" in m for m in fallbacks)
    assert all(isinstance(m, QuantLinear) for m in (model.layers[1].mlp.down_proj, model.layers[0].self_attn.q_proj))
