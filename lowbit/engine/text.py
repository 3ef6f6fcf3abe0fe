"""Text in and out of the engine: prompts through the chat template, and generated tokens back to text
as they arrive, for ``lowbit generate`` (the terminal) and ``lowbit serve`` (streamed chunks) alike.

Detokenizing a stream is not decoding each token alone: byte-level BPE splits a UTF-8 character over
several tokens, and SentencePiece decodes a leading space differently at the start of a text. Decoding
the whole text again at every token is right but costs O(n) per token, O(n^2) per answer.
``IncrementalDetokenizer`` decodes a short window instead (the tokens of the last emitted piece plus
the new ones: the scheme of Hugging Face's text-generation-inference), so each token costs O(1) and
the pieces join to exactly the text a full decode gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lowbit.errors import LowbitError


def decode(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """Text of generated tokens, special tokens dropped.

    ``clean_up_tokenization_spaces`` is a WordPiece-era post-process that deletes the space before
    punctuation; it corrupts byte-level BPE output (and some transformers versions warn on every call).
    """
    return tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` (``{"role", "content"}`` dicts) through the tokenizer's chat template,
    ending with the assistant's turn. Raises LowbitError when there is no template, or when the
    template refuses the messages (some require alternating roles, or no system message)."""
    if not getattr(tokenizer, "chat_template", None):
        raise LowbitError("this model's tokenizer has no chat template; send the raw prompt instead")
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError and whatever a template raises
        raise LowbitError(f"the model's chat template refused these messages: {exc}") from exc
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer: Any, text: str, *, chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids for a user prompt: through the tokenizer's chat template when it has one and ``chat``."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return chat_prompt(tokenizer, messages)
    return tokenizer(text)["input_ids"]


class IncrementalDetokenizer:
    """The text of a growing list of tokens, piece by piece (module docstring).

    ``push(token)`` returns the new text (possibly empty: half of a UTF-8 character, or a tail that
    could begin a stop string, is held back). With ``stops``, the text ends before the first stop
    string: ``stopped`` turns True and nothing more is returned. ``flush()`` returns what was held
    back once the generation has ended. The pieces joined equal ``decode(tokenizer, tokens)`` cut at
    the first stop string.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.stopped = False
        self._prefix = 0  # the window to decode starts here (the tokens of the last decoded piece)
        self._read = 0  # tokens up to here are in self._text
        self._text = ""  # decoded so far (complete characters only)
        self._sent = 0  # characters of self._text returned to the caller

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        window = self.ids[self._prefix:]
        before = decode(self.tokenizer, self.ids[self._prefix:self._read])
        text = decode(self.tokenizer, window)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._text += text[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """What is left once no token will come: a held-back tail, an incomplete character's text."""
        if self.stopped:
            return ""
        if self._read < len(self.ids):
            before = decode(self.tokenizer, self.ids[self._prefix:self._read])
            self._text += decode(self.tokenizer, self.ids[self._prefix:])[len(before):]
            self._prefix = self._read = len(self.ids)
        return self._release(final=True)

    @property
    def text(self) -> str:
        """All the text returned so far."""
        return self._text[:self._sent]

    def _release(self, final: bool) -> str:
        text = self._text
        # what was returned holds no stop string and does not end with the start of one (held back)
        for s in self.stops:
            at = text.find(s, self._sent)
            if at >= 0:
                self.stopped = True
                out = text[self._sent:at]
                self._sent = at
                return out
        safe = len(text)
        if not final:
            for s in self.stops:  # hold back a tail that could be the start of a stop string
                for k in range(min(len(s) - 1, safe - self._sent), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        out = text[self._sent:safe] if safe > self._sent else ""
        self._sent = max(self._sent, safe)
        return out
