"""Tiny random Hugging Face models of each supported architecture, the reference for parity tests."""

from __future__ import annotations

import torch

# name -> (transformers config class name, config kwargs). Sizes are tiny but keep every feature
# on: GQA, odd head counts, llama3 rope scaling, sliding window shorter than the test sequences,
# Qwen2's q/k/v bias, tied embeddings (SmolLM), Llama's attention and MLP biases.
TINY_ARCHS: dict[str, tuple[str, dict]] = {
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama3": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            rope_parameters=dict(
                rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama-bias": ("LlamaConfig", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "smollm": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def make_hf_model(arch: str, seed: int = 0, **overrides):
    """A random transformers model of ``arch`` (fp32, eager attention), with non-trivial norms and biases."""
    import transformers

    cls_name, extra = TINY_ARCHS[arch]
    kwargs = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def save_tiny_tokenizer(path, vocab: int = 97) -> None:  # noqa: ANN001
    """A word-level tokenizer over the tiny models' vocabulary ("w3".."w96"), with a chat template.

    Ids 0, 1, 2 are <pad>, <s>, </s> (the tiny configs' pad, bos and eos ids), so the models' stop token
    decodes as it should.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def greedy_text(loaded, text: str, n: int) -> str:
    """The greedy continuation (up to ``n`` tokens) of ``text`` by ``loaded``, generated alone in-process by the eager reference path."""
    from lowbit.engine.reference import reference_generate as generate  # the eager path, not the engine
    from lowbit.engine.text import decode
    from lowbit.engine.sampling import SamplingParams

    ids = loaded.tokenizer(text)["input_ids"]
    out = generate(loaded.model, [ids], SamplingParams(max_new_tokens=n, stop_token_ids=loaded.stop_token_ids))[0]
    return decode(loaded.tokenizer, out.token_ids)


def quantized_layers(model) -> dict:  # noqa: ANN001
    """A lowbit model's QuantLinears by checkpoint (Hugging Face) name: ``model.layers.0.self_attn.q_proj``."""
    from lowbit.model.qlinear import QuantLinear

    return {f"model.{n}": m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def assert_layers_dequantize_to(model, expected: dict, atol: float) -> None:  # noqa: ANN001
    """Every quantized layer's fp32 dequantized weight equals ``expected[name]`` (a producer's own
    dequantization, rounded to fp16) within one fp16 rounding (rtol 2^-10) and ``atol``."""
    import torch

    layers = quantized_layers(model)
    for name, want in expected.items():
        torch.testing.assert_close(layers[name].dequantized_weight(), want.float(), rtol=2**-10, atol=atol)


def assert_logits_match_dequantized(ours, hf, expected: dict, tmp_path) -> None:  # noqa: ANN001
    """``ours`` (a lowbit model read from another tool's checkpoint) against ``hf`` (the transformers
    model it was packed from) with each Linear replaced by the producer's dequantized weight, both
    through our reference forward: the two differ only by the producer's fp16 rounding."""
    import torch

    from lowbit.model.loader import load_model

    with torch.no_grad():
        sd = hf.state_dict()
        for name, w in expected.items():
            sd[f"{name}.weight"].copy_(w.float())
    hf.save_pretrained(tmp_path / "dequantized")
    ref = load_model(tmp_path / "dequantized", device="cpu", dtype="fp32", with_tokenizer=False).model
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = ours(ids), ref(ids)
    assert ((got - want).norm() / want.norm()).item() < 2e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))
