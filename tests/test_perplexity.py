"""Tests for lowbit.eval.perplexity: tokenizing, chunking, the perplexity arithmetic, and the real model."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval.corpus import join_texts
from lowbit.eval.perplexity import PerplexityResult, chunk_tokens, evaluate, perplexity, tokenize_corpus
from lowbit.model.loader import load_model
from tests.tiny_models import make_hf_model

VOCAB = 97  # tiny_models' vocab_size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama2")
    make_hf_model("llama2").save_pretrained(path)
    return load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model


@pytest.fixture(scope="module")
def chunks() -> torch.Tensor:
    torch.manual_seed(0)
    return chunk_tokens(torch.randint(0, VOCAB, (7 * 24 + 5,)), 24)  # 7 windows of 24, 5 tokens dropped


class NextTokenOracle(nn.Module):
    """Puts (nearly) all probability on the true next token of a stream where token t is followed by t + 1."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.one_hot((input_ids + 1) % VOCAB, VOCAB).float() * 1e4


class Uniform(NextTokenOracle):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, VOCAB)


# ---------------------------------------------------------------- tokenizing and chunking

def test_tokenize_corpus_is_one_call_without_warning():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "a", "cat", "dog", "sat", "on", "mat"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=4, bos_token="the")
    texts = ["the cat sat on the mat", "a dog sat"]
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        ids = tokenize_corpus(tok, texts)
        quiet = list(messages)
        plain = tok(join_texts(texts), add_special_tokens=False)["input_ids"]  # control: this one warns
    finally:
        logger.removeHandler(handler)
    assert ids.dtype == torch.long and ids.shape == (9,)  # longer than model_max_length
    assert ids.tolist() == plain
    too_long = "longer than the specified maximum"
    assert not [m for m in quiet if too_long in m] and [m for m in messages if too_long in m]


def test_chunk_shapes_and_dropped_tail():
    ids = torch.arange(23)
    out = chunk_tokens(ids, 5)
    assert out.shape == (4, 5) and out.dtype == ids.dtype
    assert torch.equal(out.reshape(-1), torch.arange(20))  # in order, tail 20..22 dropped
    assert chunk_tokens(torch.arange(10), 5).shape == (2, 5)  # exact multiple: nothing dropped
    assert chunk_tokens(torch.arange(5), 5).shape == (1, 5)


def test_chunk_too_short():
    with pytest.raises(LowbitError, match=r"too short: 4 tokens, need at least 5"):
        chunk_tokens(torch.arange(4), 5)
    with pytest.raises(LowbitError, match="seq_len"):
        chunk_tokens(torch.arange(10), 1)


# ---------------------------------------------------------------- the arithmetic

def test_matches_hand_computation(tiny, chunks):
    logits = tiny(chunks)
    expected = math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), chunks[:, 1:].reshape(-1)).item())
    result = perplexity(tiny, chunks, batch_size=8, progress=False)
    assert isinstance(result, PerplexityResult)
    assert (result.chunks, result.tokens) == (7, 7 * 23)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-5)
    assert 1 < result.ppl < 10 * VOCAB


@pytest.mark.parametrize("batch_size", [1, 3])
def test_independent_of_batch_size(tiny, chunks, batch_size):
    reference = perplexity(tiny, chunks, batch_size=8, progress=False)
    result = perplexity(tiny, chunks, batch_size=batch_size, progress=True)
    assert result.ppl == pytest.approx(reference.ppl, rel=1e-6)
    assert (result.tokens, result.chunks) == (reference.tokens, reference.chunks)


def test_perfect_model_has_ppl_one():
    stream = torch.arange(5 * 16) % VOCAB  # every next token is the previous one + 1
    result = perplexity(NextTokenOracle(), chunk_tokens(stream, 16), batch_size=2, progress=False)
    assert result.ppl == pytest.approx(1.0, abs=1e-9)
    assert (result.tokens, result.chunks) == (5 * 15, 5)


def test_uniform_model_has_ppl_vocab_size(chunks):
    result = perplexity(Uniform(), chunks, batch_size=3, progress=False)
    assert math.isclose(result.ppl, VOCAB, rel_tol=1e-6)
    assert math.isclose(result.nll, math.log(VOCAB), rel_tol=1e-6)


def test_nan_logits_raise(tiny, chunks):
    weight = tiny.layers[1].mlp.down_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0] = float("nan")
        with pytest.raises(LowbitError, match="NaN/Inf logits"):
            perplexity(tiny, chunks, batch_size=4, progress=False)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_logit_anywhere_raises(chunks, bad):
    class OneBadLogit(Uniform):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            logits = super().forward(input_ids)
            logits[-1, 5, 17] = bad  # a single non-target logit in the last window of the batch
            return logits

    with pytest.raises(LowbitError, match="NaN/Inf logits"):
        perplexity(OneBadLogit(), chunks, batch_size=3, progress=False)


def test_bad_arguments(tiny, chunks):
    with pytest.raises(LowbitError, match="batch_size"):
        perplexity(tiny, chunks, batch_size=0, progress=False)
    with pytest.raises(LowbitError, match="shape"):
        perplexity(tiny, chunks.reshape(-1), progress=False)


# ---------------------------------------------------------------- the real default model

@pytest.mark.asset
def test_default_model_wiki_perplexity():
    loaded = load_model("smollm2-135m", device="cpu", dtype="fp32")
    result = evaluate(loaded, "wiki", seq_len=512, max_chunks=8, batch_size=4, progress=False)
    print(f"smollm2-135m wiki eval, 8 x 512 tokens: ppl {result.ppl:.3f} (nll {result.nll:.4f})")
    assert (result.chunks, result.tokens) == (8, 8 * 511)
    assert math.isfinite(result.ppl) and 5 < result.ppl < 100
