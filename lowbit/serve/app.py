"""OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI; served by uvicorn).

Endpoints: ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (both with ``"stream": true`` as server-sent events ending in
``data: [DONE]``). What requests may hold is in ``lowbit.serve.protocol``.

Errors follow the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` and never take the
server down:
- 400: invalid or unsupported parameters (named), malformed JSON, empty prompts, token ids outside
  the vocabulary, prompt + ``max_tokens`` beyond the context (with both numbers);
- 401: a missing or wrong API key (``api_key``: every ``/v1`` route then needs
  ``Authorization: Bearer KEY``; compared in constant time); 404: a model this server does not serve;
- 413: a body larger than ``max_body_bytes``; 429 + ``Retry-After``: the server is full (KV slots
  plus ``max_queue`` waiting); 503 + ``Retry-After``: draining for shutdown, or the engine restarting;
- 500: the engine failed while running the request (``lowbit.serve.engine_loop``). A stream that has
  already started gets an error event, then ``data: [DONE]``.
A streaming request waits for its first event before its headers are sent, so that an error before
the first token still gets its status code. A client that disconnects cancels its request, which
frees its KV slot at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lowbit.engine.sampling import SamplingParams
from lowbit.engine.scheduler import Engine, TokenEvent
from lowbit.engine.text import IncrementalDetokenizer, chat_prompt
from lowbit.errors import LowbitError
from lowbit.serve.engine_loop import EngineLoop, RequestFailed
from lowbit.serve.metrics import CONTENT_TYPE, ServerMetrics
from lowbit.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    check_unsupported,
    max_new_tokens,
    prompt_token_lists,
)

DEFAULT_MAX_BODY_BYTES = 4 << 20  # a 128k-token prompt as text or as token ids is < 1 MiB
_DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclass
class Served:
    """What ``app.state.served`` holds: the model ids, the loaded model, the engine loop, the metrics."""

    names: tuple[str, ...]
    loaded: Any  # LoadedModel
    loop: EngineLoop
    metrics: ServerMetrics
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @property
    def name(self) -> str:
        return self.names[0]


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.body(), headers=exc.headers)


class _Gate:
    """ASGI middleware in front of every route: counts answers by status for /metrics, and for ``/v1``
    routes refuses (in this order) a draining server (503), a missing or wrong API key (401) and a body
    over the limit (413, the body read at most once past the limit and then replayed to the app)."""

    def __init__(self, app: Any, served: Served) -> None:
        self.app, self.served = app, served

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ("/health", "/metrics", "/v1/models", "/v1/completions",
                                 "/v1/chat/completions") else "other"
        status = [500]

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = None
            if path.startswith("/v1"):
                refusal = self._refusal(scope)
                if refusal is None:
                    receive, refusal = await self._bounded_body(scope, receive)
            if refusal is not None:
                await _error_response(refusal)(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            self.served.metrics.requests.labels(route, str(status[0])).inc()

    def _refusal(self, scope: dict) -> ApiError | None:
        if self.served.loop.draining:
            return self.served.loop.draining_error()
        key = self.served.api_key
        if key is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            # constant-time comparison: the time taken does not tell how much of a guess was right
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode()):
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' with the key "
                                     "the server was started with (--api-key or LOWBIT_API_KEY)",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _bounded_body(self, scope: dict, receive: Callable) -> tuple[Callable, ApiError | None]:
        limit = self.served.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return receive, too_big
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return receive, ApiError(400, "the client disconnected while sending the request")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return receive, too_big
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        return replay, None


@dataclass
class _Choice:
    """One prompt of a request: its engine request, text so far and how it ended."""

    index: int
    tracker: IncrementalDetokenizer
    tokens: int = 0
    finish: str | None = None
    last_token_at: float | None = None


@dataclass
class _Pending:
    """An HTTP request's engine requests and the queue their events arrive on."""

    choices: dict[int, _Choice]  # by engine request id
    queue: asyncio.Queue
    submitted_at: float
    prompt_tokens: int
    finished: set[int] = field(default_factory=set)
    getter: asyncio.Future | None = None  # a queue.get() in flight across disconnect polls
    checked_at: float = 0.0  # when the client's connection was last checked (non-streaming)

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.choices)


def create_app(loaded: Any, engine: Engine, name: str | Sequence[str], *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_queue: int | None = None) -> FastAPI:
    """The FastAPI app serving ``loaded`` (a LoadedModel with a tokenizer) through ``engine``.

    ``name``: the model id clients ask for, or several (the first is listed first). ``api_key``: the
    key ``/v1`` routes require (None: open). ``max_queue``: requests that may wait for a KV slot (see
    ``EngineLoop``). ``app.state.served`` is the ``Served`` record; ``served.loop.on_fatal`` is what
    runs when the engine cannot be rebuilt (``lowbit.serve.runner`` sets it to end the process).
    """
    if loaded.tokenizer is None:
        raise LowbitError(f"{loaded.path} ships no tokenizer; serving needs tokenizer files beside the weights")
    names = (name,) if isinstance(name, str) else tuple(name)
    if not names or not all(names):
        raise LowbitError("the served model needs a non-empty name (--name)")
    if max_body_bytes < 1:
        raise LowbitError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    loop = EngineLoop(engine, max_queue=max_queue)
    metrics = ServerMetrics(lambda: loop.engine.stats())
    loop.on_restart = metrics.restarts.inc
    served = Served(names, loaded, loop, metrics, api_key or None, max_body_bytes)
    tokenizer = loaded.tokenizer
    vocab = loaded.config.vocab_size

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served.loop.start()
        yield
        served.loop.stop()

    app = FastAPI(title="lowbit", description="OpenAI-compatible API for a low-bit model", lifespan=lifespan)
    app.add_middleware(_Gate, served=served)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ())[1:]]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return _error_response(ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                                            .rstrip(": "), None))
        if first.get("type") == "extra_forbidden":
            return _error_response(ApiError(400, f"unsupported parameter {param!r}: lowbit does not implement it",
                                            param))
        return _error_response(ApiError(400, f"invalid request: {param or 'body'}: {first.get('msg', 'bad input')}",
                                        param))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.get("/health")
    async def health() -> Any:
        loop = served.loop
        if loop.draining:
            return JSONResponse(status_code=503, content={"status": "draining"})
        if loop.state != "ok":
            return JSONResponse(status_code=503, content={"status": loop.state, "detail": repr(loop.error)})
        return {"status": "ok", "restarts": loop.restarts}

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(served.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "lowbit"}
                                           for n in names]}

    def _check_model(model: str) -> None:
        if model not in names:
            raise ApiError(404, f"model {model!r} is not served here; this server serves "
                                f"{', '.join(repr(n) for n in names)}", "model", code="model_not_found")

    def _params(req: CompletionRequest | ChatRequest, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(max_new_tokens=max_tokens,
                                  temperature=1.0 if req.temperature is None else req.temperature,
                                  top_p=1.0 if req.top_p is None else req.top_p,
                                  top_k=max(0, req.top_k or 0), seed=req.seed,
                                  stop_token_ids=tuple(loaded.stop_token_ids))
        except LowbitError as exc:
            raise ApiError(400, str(exc)) from exc

    def _submit(req: CompletionRequest | ChatRequest, prompts: list[list[int]], max_tokens: int | None,
                param: str) -> _Pending:
        context = served.loop.engine.max_len
        params = [_params(req, max_new_tokens(max_tokens, len(p), context, param)) for p in prompts]
        queue: asyncio.Queue = asyncio.Queue()
        rids = served.loop.submit(prompts, params, queue)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        choices = {rid: _Choice(i, IncrementalDetokenizer(tokenizer, stops)) for i, rid in enumerate(rids)}
        prompt_tokens = sum(len(p) for p in prompts)
        served.metrics.prompt_tokens.inc(prompt_tokens)
        return _Pending(choices, queue, time.perf_counter(), prompt_tokens)

    def _cancel(pending: _Pending) -> None:
        if pending.getter is not None:
            pending.getter.cancel()
        for rid, c in pending.choices.items():
            if rid not in pending.finished:
                served.loop.cancel(rid)

    async def _next(pending: _Pending, request: Request | None) -> tuple[_Choice, str, str | None]:
        """The next piece of text of one of the request's choices: (choice, text, finish reason or None).

        Raises ApiError when the engine failed the request. With ``request`` (non-streaming), a client
        that went away cancels the request instead of letting it run to its end.
        """
        while True:
            if request is None:
                rid, ev = await pending.queue.get()
            else:
                # one getter task kept across polls: asyncio.wait leaves it running on a timeout, where
                # wait_for would cancel it and (Python 3.11) could drop an event that arrived meanwhile
                if pending.getter is None:
                    pending.getter = asyncio.ensure_future(pending.queue.get())
                done, _ = await asyncio.wait({pending.getter}, timeout=_DISCONNECT_POLL_S)
                now = time.perf_counter()
                if not done or now - pending.checked_at >= _DISCONNECT_POLL_S:  # also while tokens flow
                    pending.checked_at = now
                    if await request.is_disconnected():
                        _cancel(pending)
                        # nginx's "client closed request": nobody reads it, /metrics counts it
                        raise ApiError(499, "the client disconnected before the response was ready")
                if not done:
                    continue
                rid, ev = pending.getter.result()
                pending.getter = None
            if isinstance(ev, RequestFailed):
                raise ApiError(ev.status, ev.message, kind=ev.kind)
            choice = pending.choices[rid]
            if choice.finish is not None:
                continue  # a stop string already ended it; this is its cancellation
            assert isinstance(ev, TokenEvent)
            now = time.perf_counter()
            text = ""
            if ev.token is not None:
                served.metrics.generation_tokens.inc()
                if choice.last_token_at is None:
                    served.metrics.ttft.observe(now - pending.submitted_at)
                else:
                    served.metrics.itl.observe(now - choice.last_token_at)
                choice.last_token_at = now
                choice.tokens += 1
                if ev.token not in loaded.stop_token_ids:
                    text = choice.tracker.push(ev.token)
            reason = None
            if choice.tracker.stopped:
                reason = "stop"
                if ev.finish_reason is None:
                    served.loop.cancel(rid)
            elif ev.finish_reason is not None:
                reason = "stop" if ev.finish_reason in ("stop", "cancelled") else "length"
                text += choice.tracker.flush()
            if reason is not None:
                choice.finish = reason
                pending.finished.add(rid)
                if pending.done:
                    served.metrics.duration.observe(now - pending.submitted_at)
            if text or reason is not None:
                return choice, text, reason

    def _usage(pending: _Pending) -> dict:
        out = sum(c.tokens for c in pending.choices.values())
        return {"prompt_tokens": pending.prompt_tokens, "completion_tokens": out,
                "total_tokens": pending.prompt_tokens + out}

    async def _respond(req: CompletionRequest | ChatRequest, pending: _Pending, chat: bool, request: Request) -> Any:
        rid_text = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = ("chat.completion.chunk" if req.stream else "chat.completion") if chat else "text_completion"

        def envelope(choices: list[dict]) -> dict:
            return {"id": rid_text, "object": obj, "created": created, "model": req.model, "choices": choices}

        def chunk(choice: _Choice, text: str, reason: str | None) -> dict:
            if not chat:
                return {"index": choice.index, "text": text, "finish_reason": reason, "logprobs": None}
            return {"index": choice.index, "delta": {"content": text} if text or reason is None else {},
                    "finish_reason": reason}

        if not req.stream:
            texts: dict[int, list[str]] = {c.index: [] for c in pending.choices.values()}
            try:
                while not pending.done:
                    choice, text, _ = await _next(pending, request)
                    texts[choice.index].append(text)
            except BaseException:
                _cancel(pending)
                raise
            choices = []
            for c in sorted(pending.choices.values(), key=lambda c: c.index):
                text = "".join(texts[c.index])
                body = {"index": c.index, "finish_reason": c.finish}
                body |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
                choices.append(body)
            return envelope(choices) | {"usage": _usage(pending)}

        try:  # the first event before the headers: an error up to here still gets its status code
            first = await _next(pending, request)
        except BaseException:
            _cancel(pending)
            raise
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse() -> AsyncIterator[str]:
            try:
                if chat:
                    for c in sorted(pending.choices.values(), key=lambda c: c.index):
                        opening = {"index": c.index, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None}
                        yield f"data: {json.dumps(envelope([opening]))}\n\n"
                yield f"data: {json.dumps(envelope([chunk(*first)]))}\n\n"
                while not pending.done:
                    try:
                        piece = await _next(pending, None)
                    except ApiError as exc:
                        yield f"data: {json.dumps(exc.body())}\n\n"
                        break
                    if await request.is_disconnected():
                        break
                    yield f"data: {json.dumps(envelope([chunk(*piece)]))}\n\n"
                if include_usage and pending.done:
                    yield f"data: {json.dumps(envelope([]) | {'usage': _usage(pending)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                _cancel(pending)  # client gone or an error: free the slots of what still runs

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        _check_model(req.model)
        check_unsupported(req)
        prompts = prompt_token_lists(req.prompt, lambda text: tokenizer(text)["input_ids"], vocab)
        pending = _submit(req, prompts, req.max_tokens, "max_tokens")
        return await _respond(req, pending, False, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        _check_model(req.model)
        check_unsupported(req)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            ids = chat_prompt(tokenizer, msgs)
        except LowbitError as exc:  # no template, or the template's own rule (e.g. roles must alternate)
            raise ApiError(400, f"{served.name}: {exc}", "messages") from exc
        if not ids:
            raise ApiError(400, "the messages render to an empty prompt", "messages")
        if req.max_completion_tokens is not None:
            max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = req.max_tokens, "max_tokens"
        pending = _submit(req, [ids], max_tokens, param)
        return await _respond(req, pending, True, request)

    app.state.served = served
    return app


def load_app(model: str | Path, *, device: str = "auto", dtype: str = "auto", name: str | Sequence[str] | None = None,
             max_slots: int | None = None, max_len: int | None = None, prefill_chunk: int = 256,
             api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
             max_queue: int | None = None) -> FastAPI:
    """Load ``model`` (a directory, a .gguf file or a known name) and build the app serving it.

    What ``lowbit serve`` runs: quantized checkpoints use the GPU kernels on CUDA; ``max_slots`` and
    ``max_len`` (tokens) default as in :class:`Engine`. The model id defaults to ``model`` exactly as
    given (as vLLM's does), so a client asks for the name the server was started with.
    """
    from lowbit.engine.inference import prepare_for_inference
    from lowbit.model.loader import load_model

    loaded = load_model(model, device=device, dtype=dtype)
    if loaded.tokenizer is None:  # checked before the engine allocates its KV cache
        raise LowbitError(f"{loaded.path} ships no tokenizer files; serving needs one beside the weights")
    prepare_for_inference(loaded.model)  # on CUDA: fused projections, quantized layers on their kernels
    engine = Engine(loaded.model, max_slots=max_slots, max_len=max_len, prefill_chunk=prefill_chunk)
    return create_app(loaded, engine, name or str(model), api_key=api_key, max_body_bytes=max_body_bytes,
                      max_queue=max_queue)
