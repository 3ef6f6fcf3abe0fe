"""OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI; served by uvicorn).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(both with ``"stream": true`` as server-sent events ending in ``data: [DONE]``). Errors follow the
OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: 404 for an unknown model, 400 for
invalid parameters or a prompt longer than the context; the server keeps serving either way.

One background thread runs ``Engine.step`` whenever there is work and hands each token to the
request's asyncio queue. A streaming client that disconnects cancels its request, which frees its
KV slot at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from lowbit.engine.generate import decode
from lowbit.engine.sampling import SamplingParams
from lowbit.engine.scheduler import Engine, TokenEvent
from lowbit.errors import LowbitError


class _GenerationRequest(BaseModel):
    """The fields completions and chat requests share."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str
    max_tokens: int = Field(16, ge=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


class EngineLoop:
    """Runs the engine on a thread; routes each request's events to its asyncio queue."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lowbit-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, prompt: list[int], params: SamplingParams) -> tuple[int, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._wake:
            rid = self.engine.add(prompt, params)
            self._queues[rid] = (loop, queue)
            self._wake.notify()
        return rid, queue

    def cancel(self, rid: int) -> None:
        with self._wake:
            if rid in self._queues:
                self.engine.cancel(rid)
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.engine.has_work:
                    self._wake.wait()
                if self._stop:
                    return
            try:
                events = self.engine.step()
            except BaseException as exc:
                self.error = exc
                with self._wake:
                    for loop, q in self._queues.values():
                        loop.call_soon_threadsafe(q.put_nowait, exc)
                raise
            for ev in events:
                with self._wake:
                    target = self._queues.get(ev.request_id)
                    if ev.finish_reason is not None:
                        self._queues.pop(ev.request_id, None)
                if target is not None:
                    loop, q = target
                    loop.call_soon_threadsafe(q.put_nowait, ev)


@dataclass
class _Served:
    name: str
    loaded: Any  # LoadedModel
    loop: EngineLoop


def _sampling(req: CompletionRequest | ChatRequest, max_tokens: int, stop_ids: tuple[int, ...]) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop_token_ids=stop_ids)
    except LowbitError as exc:
        raise ApiError(400, str(exc)) from exc


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


class _TextTracker:
    """Incremental detokenization: the new text of each token, held back while a UTF-8 character or a
    stop string may still be incomplete."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops, self.ids, self.sent = tokenizer, stops, [], 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = decode(self.tokenizer, self.ids)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                out, self.sent = text[self.sent:at], at
                return out
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text) - 1
        for s in self.stops:  # keep back a tail that could be the start of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        out = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = decode(self.tokenizer, self.ids)
        out, self.sent = text[self.sent:], len(text)
        return out


def create_app(loaded: Any, engine: Engine, name: str) -> FastAPI:
    """The FastAPI app serving ``loaded`` (a LoadedModel with a tokenizer) through ``engine`` as ``name``."""
    if loaded.tokenizer is None:
        raise LowbitError(f"{loaded.path} ships no tokenizer; serving needs tokenizer files beside the weights")
    served = _Served(name, loaded, EngineLoop(engine))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served.loop.start()
        yield
        served.loop.stop()

    app = FastAPI(title="lowbit", description="OpenAI-compatible API for a low-bit model", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(400, f"invalid request: {first.get('msg', 'bad input')}", param)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.get("/health")
    async def health() -> dict:
        if served.loop.error is not None:
            return JSONResponse(status_code=503, content={"status": "error", "detail": repr(served.loop.error)})
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lowbit"}]}

    def _check_model(model: str) -> None:
        if model != name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {name!r}", "model",
                           "model_not_found")

    def _submit_ids(ids: list[int], params: SamplingParams) -> tuple[int, asyncio.Queue]:
        try:
            return served.loop.submit(ids, params)
        except LowbitError as exc:
            raise ApiError(400, str(exc), "prompt") from exc

    async def _run(ids: list[int], params: SamplingParams, stops: list[str], chat: bool, stream: bool,
                   request: Request) -> Any:
        rid, queue = _submit_ids(ids, params)
        rid_text = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        tracker = _TextTracker(loaded.tokenizer, stops)
        stop_ids = set(params.stop_token_ids)

        async def events() -> AsyncIterator[tuple[str, str | None]]:
            """(new text, finish reason or None) per engine event."""
            while True:
                ev = await queue.get()
                if isinstance(ev, BaseException):
                    raise ApiError(500, f"the engine failed: {ev!r}", kind="server_error")
                assert isinstance(ev, TokenEvent)
                text = ""
                if ev.token is not None and ev.token not in stop_ids:
                    text = tracker.push(ev.token)
                if tracker.stopped and ev.finish_reason is None:
                    served.loop.cancel(rid)
                    yield text, "stop"
                    return
                if ev.finish_reason is not None:
                    reason = "stop" if ev.finish_reason in ("stop", "cancelled") else "length"
                    yield text + tracker.flush(), reason
                    return
                yield text, None

        def payload(text: str, reason: str | None, final: bool) -> dict:
            if chat:
                body = {"index": 0, "finish_reason": reason}
                if stream:
                    body["delta"] = {"content": text} if not final or text else {}
                else:
                    body["message"] = {"role": "assistant", "content": text}
                obj = "chat.completion.chunk" if stream else "chat.completion"
            else:
                body = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
                obj = "text_completion"
            return {"id": rid_text, "object": obj, "created": created, "model": name, "choices": [body]}

        if not stream:
            parts, reason = [], "length"
            try:
                async for text, r in events():
                    parts.append(text)
                    reason = r or reason
            except asyncio.CancelledError:
                served.loop.cancel(rid)
                raise
            out = payload("".join(parts), reason, True)
            n_out = len(tracker.ids)
            out["usage"] = {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}
            return out

        async def sse() -> AsyncIterator[str]:
            finished = False
            try:
                if chat:
                    first = payload("", None, False)
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield f"data: {json.dumps(first)}\n\n"
                async for text, r in events():
                    if await request.is_disconnected():
                        break
                    yield f"data: {json.dumps(payload(text, r, r is not None))}\n\n"
                    if r is not None:
                        finished = True
                yield "data: [DONE]\n\n"
            finally:
                if not finished:  # client gone (or error): free the slot
                    served.loop.cancel(rid)

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        _check_model(req.model)
        ids = loaded.tokenizer(req.prompt)["input_ids"]
        params = _sampling(req, req.max_tokens, tuple(loaded.stop_token_ids))
        return await _run(ids, params, _stops(req.stop), False, req.stream, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        _check_model(req.model)
        tok = loaded.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, f"{name} has no chat template; use /v1/completions", "messages")
        msgs = [m.model_dump() for m in req.messages]
        rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        max_tokens = req.max_completion_tokens or req.max_tokens or 256
        params = _sampling(req, max_tokens, tuple(loaded.stop_token_ids))
        return await _run(ids, params, _stops(req.stop), True, req.stream, request)

    app.state.served = served
    return app


def load_app(model: str | Path, *, device: str = "auto", dtype: str = "auto", name: str | None = None,
             max_slots: int | None = None, max_len: int | None = None, prefill_chunk: int = 256) -> FastAPI:
    """Load ``model`` (a directory, a .gguf file or a known name) and build the app serving it.

    What ``lowbit serve`` runs: quantized checkpoints use the GPU kernels on CUDA; ``max_slots`` and
    ``max_len`` (tokens) default as in :class:`Engine`. ``app.state.served`` holds the served ``name``,
    the ``loaded`` model and the engine (``loop.engine``).
    """
    from lowbit.model.loader import load_model

    loaded = load_model(model, device=device, dtype=dtype)
    if loaded.tokenizer is None:  # checked before the engine allocates its KV cache
        raise LowbitError(f"{loaded.path} ships no tokenizer files; serving needs one beside the weights")
    if loaded.device.type == "cuda":
        from lowbit.model.fuse import fuse_projections
        from lowbit.model.qlinear import use_kernels

        fuse_projections(loaded.model)  # q/k/v and gate/up as one GEMM each
        if getattr(loaded.model, "quant_scheme", None) is not None:
            use_kernels(loaded.model)
    engine = Engine(loaded.model, max_slots=max_slots, max_len=max_len, prefill_chunk=prefill_chunk)
    return create_app(loaded, engine, name or loaded.path.name)


class BackgroundServer:
    """Serves ``app`` with uvicorn on a daemon thread of this process; ``with`` yields its base URL.

    Port 0 (the default) takes a free port from the OS. For tests and ``lowbit bench serve MODEL``;
    ``lowbit serve`` runs uvicorn on the main thread instead.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0) -> None:
        self.app, self.host, self.port, self.start_timeout_s = app, host, port, start_timeout_s
        self.url = ""

    def __enter__(self) -> str:
        try:
            import uvicorn
        except ImportError as exc:
            raise LowbitError(f"serving needs uvicorn ({exc}); pip install uvicorn") from exc
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="lowbit-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._server.started:
            # uvicorn ends its thread (logging why) when it cannot bind or the app's startup fails
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                raise LowbitError(f"the server did not start on {self.host}:{self.port} within "
                                  f"{self.start_timeout_s:.0f} s; see uvicorn's log above")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
