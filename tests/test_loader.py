"""Loading from HF directories and GGUF files, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.model.config import ModelConfig
from lowbit.model.loader import load_model
from lowbit.model.qlinear import QuantLinear
from tests.tiny_models import make_hf_model


def _load(path):
    return load_model(path, device="cpu", dtype="fp32", with_tokenizer=False)


# ---------------------------------------------------------------- GGUF

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (the inverse of what our loader undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(ref, path, quantize: bool = True) -> None:
    """Write a transformers Llama as GGUF the way llama.cpp does: permuted q/k, Q8_0/Q4_1 matrices."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    c = ref.config
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf, t in ref.state_dict().items():
        if c.tie_word_embeddings and hf == "lm_head.weight":
            continue
        a = t.numpy().astype(np.float32)
        if hf in names:
            name = names[hf]
        else:
            parts = hf.split(".")  # model.layers.N.<module...>.weight
            name = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.{parts[-1]}"
        if name.endswith("attn_q.weight"):
            a = _llama_cpp_permute(a, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            a = _llama_cpp_permute(a, c.num_key_value_heads)
        if quantize and a.ndim == 2:
            qtype = Q.Q8_0 if name == "token_embd.weight" else Q.Q4_1
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _dequantized_like_gguf(ref) -> None:
    """Round ref's matrices through the same GGML types, so both sides hold identical weights."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2:
                qtype = Q.Q8_0 if "embed_tokens" in name else Q.Q4_1
                a = p.numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)))


@pytest.mark.parametrize("arch", ["smollm", "llama2"])  # tied and untied heads
def test_gguf_logits_match_transformers(arch, tmp_path):
    ref = make_hf_model(arch)
    _dequantized_like_gguf(ref)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(ref, path)
    ours = _load(path)
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    assert ours.stop_token_ids == (2,)
    ids = torch.randint(3, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_truncated_gguf_is_a_clear_error(tmp_path):
    ref = make_hf_model("llama2")
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(ref, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LowbitError, match="truncated|corrupt"):
        _load(path)


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), arch="gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(LowbitError, match="unsupported GGUF architecture 'gpt2'.*llama"):
        _load(path)


# ---------------------------------------------------------------- HF directories

@pytest.fixture
def hf_dir(tmp_path):
    make_hf_model("llama2").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_path():
    with pytest.raises(LowbitError, match="no such model.*smollm2-135m"):
        _load("/no/such/dir")


def test_directory_without_config(hf_dir):
    (hf_dir / "config.json").unlink()
    with pytest.raises(LowbitError, match="no config.json"):
        _load(hf_dir)


def test_weights_file_instead_of_directory(hf_dir):
    with pytest.raises(LowbitError, match="pass the directory"):
        _load(hf_dir / "model.safetensors")


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_config_missing_required_field(hf_dir, field):
    cfg = json.loads((hf_dir / "config.json").read_text())
    del cfg[field]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match=f"lacks required field.*{field}"):
        _load(hf_dir)


def test_unsupported_architecture_names_the_supported_ones(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match="unsupported architecture 'gpt_neox'.*llama, mistral, qwen2"):
        _load(hf_dir)


def test_corrupt_config_json(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(LowbitError, match="not valid JSON"):
        _load(hf_dir)


def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(LowbitError, match="corrupt or truncated"):
        _load(hf_dir)


def test_missing_shard(tmp_path):
    make_hf_model("llama2").save_pretrained(tmp_path, max_shard_size="100KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(LowbitError, match="shard model-00002.*missing"):
        _load(tmp_path)


def test_pickle_weights_only(hf_dir):
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(LowbitError, match="reads safetensors"):
        _load(hf_dir)


def test_unknown_tensor_and_missing_tensor(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(hf_dir / "model.safetensors")
    bad = dict(tensors, **{"model.layers.0.self_attn.q_proj.qweight": torch.zeros(2, dtype=torch.int32)})
    save_file(bad, hf_dir / "model.safetensors")
    with pytest.raises(LowbitError, match="does not know.*qweight"):
        _load(hf_dir)
    del tensors["model.norm.weight"]
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(LowbitError, match=r"model.safetensors lacks tensor 'model.norm.weight'"):
        _load(hf_dir)


def test_shape_mismatch(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match="has shape .* config implies"):
        _load(hf_dir)


def test_loads_in_half_precision_with_fp32_rope(hf_dir):
    loaded = load_model(hf_dir, device="cpu", dtype="bf16", with_tokenizer=False)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert loaded.model.inv_freq.dtype == torch.float32
    logits = loaded.model(torch.randint(3, 97, (1, 5)))
    assert torch.isfinite(logits).all()


def test_config_transformers4_rope_keys():
    """transformers 4.x config.json: rope_theta + rope_scaling instead of rope_parameters."""
    cfg = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
               num_attention_heads=2, rope_theta=500000.0,
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192))
    c = ModelConfig.from_hf(cfg)
    assert (c.rope.kind, c.rope.theta, c.rope.factor) == ("llama3", 500000.0, 8.0)
    assert c.num_kv_heads == 2 and c.head_dim == 4
    cfg["rope_scaling"] = dict(rope_type="yarn", factor=4.0)
    with pytest.raises(LowbitError, match="rope scaling 'yarn' is not supported"):
        ModelConfig.from_hf(cfg)


def test_device_and_dtype_errors(hf_dir):
    with pytest.raises(LowbitError, match="unknown dtype 'int3'"):
        load_model(hf_dir, device="cpu", dtype="int3", with_tokenizer=False)
    with pytest.raises(LowbitError, match="unknown device"):
        load_model(hf_dir, device="tpu:9", with_tokenizer=False)
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match="no CUDA GPU"):
            load_model(hf_dir, device="cuda", with_tokenizer=False)


def test_a_quantized_checkpoint_streams_into_a_meta_model(tmp_path, monkeypatch):
    """Issue 17 item 3 on the CPU: the model is built on the meta device (no float allocation of the
    Linears a W4 checkpoint replaces: ``to_empty`` never runs), and each quantized layer is built as
    soon as its own tensors have arrived, so at most one layer's tensors wait at a time. Loaded, it
    holds exactly the saved tensors. (The GPU figure, peak allocated bytes against the checkpoint's,
    is bench/load_memory.py's.)"""
    from lowbit.bench.synthetic import LLAMA3_8B, quantize_rtn, random_model
    from lowbit.formats import KV_FORMATS
    from lowbit.model import native_checkpoint
    from lowbit.model.loader import load_model
    from lowbit.model.native_checkpoint import save_quantized

    cfg = {**LLAMA3_8B, "vocab_size": 97, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
    model = quantize_rtn(random_model(cfg, "cpu", torch.float16), "w4a8+kv8", progress=False)
    save_quantized(model, tmp_path / "q")

    def no_to_empty(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise AssertionError("the loader allocated a float model first")

    waiting: list[int] = []
    take = native_checkpoint.QuantizedLayerStager.take

    def spy(self, key, tensor):  # noqa: ANN001, ANN202
        consumed = take(self, key, tensor)
        waiting.append(sum(t.nbytes for own in self._staged.values() for t in own.values()))
        return consumed

    monkeypatch.setattr(torch.nn.Module, "to_empty", no_to_empty)
    monkeypatch.setattr(native_checkpoint.QuantizedLayerStager, "take", spy)
    loaded = load_model(tmp_path / "q", device="cpu", dtype="fp16", with_tokenizer=False).model
    largest = max(sum(b.nbytes for b in m.buffers()) for m in model.modules() if isinstance(m, QuantLinear))
    assert waiting and 0 < max(waiting) <= largest
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    saved, got = model.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    assert loaded.kv_format == model.kv_format == KV_FORMATS["int8"]  # every layer's, set by the scheme
    assert all(layer.self_attn.kv_format == KV_FORMATS["int8"] for layer in loaded.layers)
    loaded.kv_format = KV_FORMATS["fp16"]  # fp16 is the model's own dtype: stored as None
    assert loaded.kv_format is None and all(layer.self_attn.kv_format is None for layer in loaded.layers)
