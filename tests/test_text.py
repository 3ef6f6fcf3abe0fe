"""Streaming detokenization: the pieces join to exactly the full decode (multi-byte characters split over
tokens included), stop strings cut the text and are held back while incomplete, and each token costs a
short decode, not a decode of everything so far."""

from __future__ import annotations

import random

import pytest

from lowbit.engine.text import IncrementalDetokenizer, chat_prompt, decode, encode_prompt
from lowbit.errors import LowbitError
from tests.tiny_models import save_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


class _Spy:
    """A tokenizer that records the length of every decode call."""

    def __init__(self, tok) -> None:  # noqa: ANN001
        self.tok, self.lengths = tok, []

    def decode(self, ids, **kw):  # noqa: ANN001, ANN003, ANN201
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kw)


def _stream(tok, ids, stops=()) -> tuple[str, IncrementalDetokenizer]:  # noqa: ANN001
    d = IncrementalDetokenizer(tok, stops)
    pieces = [d.push(t) for t in ids]
    pieces.append(d.flush())
    assert "".join(pieces) == d.text
    return "".join(pieces), d


def test_pieces_join_to_the_full_decode_word_level(tiny_tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(0, 97) for _ in range(rng.randrange(1, 40))]  # special tokens (0-2) included
        text, _ = _stream(tiny_tok, ids)
        assert text == decode(tiny_tok, ids)


@pytest.mark.asset
def test_pieces_join_to_the_full_decode_byte_level_bpe():
    """The default model's byte-level BPE: random ids split multi-byte characters across tokens."""
    from lowbit.model.loader import load_model

    tok = load_model("smollm2-135m", device="cpu", dtype="fp32").tokenizer
    rng = random.Random(1)
    emoji = tok("naïve café 😀 日本語 — done", add_special_tokens=False)["input_ids"]
    cases = [emoji, emoji[::-1]] + [[rng.randrange(0, tok.vocab_size) for _ in range(60)] for _ in range(10)]
    for ids in cases:
        text, _ = _stream(tok, ids)
        assert text == decode(tok, ids)


def test_each_token_costs_a_short_decode(tiny_tok):
    spy = _Spy(tiny_tok)
    ids = [3 + i % 90 for i in range(400)]
    text, _ = _stream(spy, ids)
    assert text == decode(tiny_tok, ids)
    assert max(spy.lengths) <= 3 and len(spy.lengths) <= 2 * len(ids) + 2  # O(1) per token, not O(n)


def test_stop_strings_cut_the_text_and_are_held_back_while_incomplete(tiny_tok):
    ids = tiny_tok("w5 w6 w7 w8 w9", add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tiny_tok, ["w7 w8"])
    out = [d.push(t) for t in ids]
    # "w5", " w6", then only " ": "w7" is held (it may begin the stop string), which never shows
    assert out[:3] == ["w5", " w6", " "]
    assert d.stopped and "".join(out) + d.flush() == "w5 w6 "
    assert d.push(ids[-1]) == ""  # after a stop nothing more
    # a tail that only looked like a stop string is released when it turns out not to be one
    text, d = _stream(tiny_tok, ids, ["w7 w9"])
    assert text == "w5 w6 w7 w8 w9" and not d.stopped
    text, d = _stream(tiny_tok, ids, ["w9"])
    assert text == "w5 w6 w7 w8 " and d.stopped


def test_chat_prompt_and_its_errors(tiny_tok):
    ids = chat_prompt(tiny_tok, [{"role": "user", "content": "w5 w6"}])
    assert decode(tiny_tok, ids) == "w5 w6"
    assert encode_prompt(tiny_tok, "w5 w6") == ids
    assert encode_prompt(tiny_tok, "w5 w6", chat=False) == tiny_tok("w5 w6")["input_ids"]

    class NoTemplate:
        chat_template = None

    with pytest.raises(LowbitError, match="no chat template"):
        chat_prompt(NoTemplate(), [{"role": "user", "content": "x"}])

    class Refusing:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
            raise ValueError("roles must alternate user/assistant")

    with pytest.raises(LowbitError, match="refused these messages: roles must alternate"):
        chat_prompt(Refusing(), [{"role": "user", "content": "x"}])
