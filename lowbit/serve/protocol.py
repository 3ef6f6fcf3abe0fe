"""What clients send to ``lowbit serve``: the OpenAI request bodies as pydantic models, and the checks
that turn a request the engine cannot honour into a 4xx that names the parameter.

Accepted as the OpenAI API defines them (what the official ``openai`` client sends):
- completions ``prompt``: a string, an array of strings, an array of token ids, or an array of such
  arrays (several prompts: one choice each, ``index`` in prompt order);
- chat ``messages``: roles ``system``, ``developer`` (rendered as ``system``), ``user``,
  ``assistant``; ``content`` a string or an array of ``{"type": "text", "text": ...}`` parts;
- ``stream_options.include_usage``; ``top_k`` (as vLLM accepts it); ``user``, ``metadata`` and
  ``store`` are accepted and ignored.
Refused with a 400 that names the parameter (not implemented, and silently ignoring them would return
something other than what was asked): ``n`` > 1, ``best_of`` > 1, ``logprobs``, ``top_logprobs``,
``echo``, ``suffix``, non-zero ``presence_penalty`` / ``frequency_penalty``, ``logit_bias``, tools
and functions, a ``response_format`` other than text, and any parameter this module does not know.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """The fields completions and chat requests share. Unknown fields are refused (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    # None (sent as null by some clients) means the OpenAI default: temperature 1, top_p 1
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; 0 and -1 mean off
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    # parsed so that their values can be checked and refused by name (check_unsupported)
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the end of the context, as vLLM does
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


def check_unsupported(req: CompletionRequest | ChatRequest) -> None:
    """Raise a 400 naming the first parameter whose value asks for something lowbit does not do."""
    refused: list[tuple[str, bool, str]] = [
        ("n", req.n not in (None, 1), "one choice per prompt; send the request n times"),
        ("presence_penalty", req.presence_penalty not in (None, 0, 0.0), "not implemented"),
        ("frequency_penalty", req.frequency_penalty not in (None, 0, 0.0), "not implemented"),
        ("logit_bias", bool(req.logit_bias), "not implemented"),
        ("logprobs", req.logprobs not in (None, False, 0), "not implemented"),
        ("top_logprobs", req.top_logprobs not in (None, 0), "not implemented"),
    ]
    if isinstance(req, CompletionRequest):
        refused += [
            ("best_of", req.best_of not in (None, 1), "one candidate per prompt"),
            ("echo", bool(req.echo), "not implemented"),
            ("suffix", req.suffix is not None, "insertion is not implemented"),
        ]
    else:
        fmt = (req.response_format or {}).get("type", "text")
        refused += [
            ("tools", bool(req.tools), "tool calling is not implemented"),
            ("tool_choice", req.tool_choice not in (None, "none"), "tool calling is not implemented"),
            ("functions", bool(req.functions), "function calling is not implemented"),
            ("function_call", req.function_call not in (None, "none"), "function calling is not implemented"),
            ("response_format", fmt != "text", f"structured output ({fmt!r}) is not implemented"),
        ]
    for param, bad, why in refused:
        if bad:
            raise ApiError(400, f"unsupported parameter {param!r} = {getattr(req, param)!r}: {why}", param)


def max_new_tokens(requested: int | None, prompt_tokens: int, context: int, param: str) -> int:
    """Output tokens for one prompt of ``prompt_tokens`` tokens in a context of ``context`` tokens.

    ``requested`` None (no limit given) takes the rest of the context. A limit that does not fit is a
    400 with both numbers, as vLLM and OpenAI answer; it is never cut silently.
    """
    if prompt_tokens >= context:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this server's context is {context} tokens "
                            "(prompt and output together); shorten the prompt", "prompt" if param == "max_tokens"
                       else "messages")
    if requested is None:
        return context - prompt_tokens
    if prompt_tokens + requested > context:
        raise ApiError(400, f"this server's context is {context} tokens, but the request needs "
                            f"{prompt_tokens + requested}: {prompt_tokens} in the prompt and {requested} in "
                            f"{param}; lower {param} to at most {context - prompt_tokens}", param)
    return requested


def prompt_token_lists(prompt: str | list[str] | list[int] | list[list[int]], tokenize: Any,
                       vocab_size: int) -> list[list[int]]:
    """The token ids of each prompt in a completions request (``tokenize``: text -> ids).

    Empty prompts, and token ids outside ``[0, vocab_size)``, are 400s naming the prompt.
    """
    if isinstance(prompt, str):
        texts_or_ids: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        texts_or_ids = [list(prompt)]  # one prompt given as token ids
    else:
        texts_or_ids = list(prompt)
    if not texts_or_ids:
        raise ApiError(400, "the prompt is empty: give a string, token ids, or an array of them", "prompt")
    out = []
    for i, p in enumerate(texts_or_ids):
        where = "prompt" if len(texts_or_ids) == 1 else f"prompt.{i}"
        ids = tokenize(p) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, f"{where} is empty (no tokens); send at least one token", "prompt")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"{where} holds token id {bad}, outside this model's vocabulary [0, {vocab_size})",
                           "prompt")
        out.append(ids)
    return out
