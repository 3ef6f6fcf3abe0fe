"""The engine on a thread of its own, between the server's asyncio handlers and ``Engine.step``.

One thread runs ``Engine.step`` whenever there is work and posts each ``TokenEvent`` to the asyncio
queue of the HTTP request it belongs to, as ``(request_id, event)``. It is also where the server's
guarantees about faults and load live:

- **Admission.** ``submit`` takes a request only while fewer than ``slots + max_queue`` requests are
  in the server; past that it answers 429 with ``Retry-After`` at once, instead of letting the queue
  (and every client's wait) grow without bound.
- **Faults.** When ``step`` raises, the engine's state is unknown: every request it had started is
  failed with a ``RequestFailed`` (a 500 naming the cause), the engine is closed and rebuilt over the
  same model (``Engine.rebuilt``: empty queues, every KV slot free, graphs captured again), the
  requests that were only queued (``Engine.unstarted``: nothing of them computed), and those that
  arrived during the rebuild (seconds on a GPU: CUDA graphs are captured again), are queued in the new
  engine under their ids, and serving goes on.
  If the rebuild raises too (a CUDA error that poisoned the context, say), the loop is *failed*: new
  requests get 503 and ``on_fatal`` is called, which in ``lowbit serve`` makes the process exit
  non-zero so that a supervisor restarts it. No request is left waiting for an event that never comes.
- **Draining.** ``start_draining`` refuses new requests (503); ``abort_all`` ends the ones in flight.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from lowbit.engine.sampling import SamplingParams
from lowbit.engine.scheduler import Engine
from lowbit.errors import LowbitError
from lowbit.serve.protocol import ApiError

log = logging.getLogger("lowbit.serve")

LoopState = Literal["ok", "restarting", "failed", "stopped"]


@dataclass(frozen=True)
class RequestFailed:
    """Posted instead of a token when a request cannot go on: HTTP ``status`` and why."""

    status: int
    message: str
    kind: str = "server_error"


class EngineLoop:
    """Runs ``engine`` on a thread; routes each request's events to its asyncio queue (module docstring)."""

    def __init__(self, engine: Engine, *, max_queue: int | None = None,
                 rebuild: Callable[[Engine], Engine] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 on_restart: Callable[[], None] | None = None) -> None:
        """``max_queue``: requests that may wait for a KV slot beyond the slots (default: 4 x the slots).
        ``rebuild``: makes a fresh engine from the failed one (default ``Engine.rebuilt``)."""
        if max_queue is not None and max_queue < 0:
            raise LowbitError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_queue = 4 * engine.num_slots if max_queue is None else max_queue
        self._rebuild = rebuild or (lambda old: old.rebuilt())
        self.on_fatal, self.on_restart = on_fatal, on_restart
        self.state: LoopState = "ok"
        self.restarts = 0
        self.error: BaseException | None = None  # the last engine failure
        self.draining = False
        self._cancel_later: set[int] = set()  # cancels of re-queued requests that came during a rebuild
        self._held: list[tuple[int, list[int], SamplingParams]] = []  # for the rebuilt engine to take
        self._routes: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lowbit-engine", daemon=True)

    # ---- called from the server's event loop ---------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)
        self.state = "stopped" if self.state == "ok" else self.state

    @property
    def capacity(self) -> int:
        """Requests the server holds at most: the KV slots plus the queue."""
        return self.engine.num_slots + self.max_queue

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished (running or queued)."""
        with self._wake:
            return len(self._routes)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], queue: asyncio.Queue) -> list[int]:
        """Queue one engine request per prompt, all or none; their events go to ``queue``.

        While the engine is being rebuilt the requests are held, under ids reserved from the old one,
        and the new engine takes them. Raises ApiError: 503 while draining or failed, 429 when the
        server is full, 400 for a prompt the engine refuses.
        """
        loop = asyncio.get_running_loop()
        with self._wake:
            self._check_open(len(prompts))
            try:
                for ids in prompts:
                    self.engine.check_prompt(ids)
            except LowbitError as exc:
                raise ApiError(400, str(exc), "prompt") from exc
            if self.state == "restarting":
                rids = [self.engine.reserve_id() for _ in prompts]
                self._held += [(rid, ids, p) for rid, ids, p in zip(rids, prompts, params, strict=True)]
            else:
                rids = [self.engine.add(ids, p) for ids, p in zip(prompts, params, strict=True)]
            for rid in rids:
                self._routes[rid] = (loop, queue)
            self._wake.notify()
        return rids

    def cancel(self, rid: int) -> None:
        """Stop a request; its slot is freed at the next engine step."""
        with self._wake:
            if rid in self._routes:
                if self.state == "restarting":
                    self._cancel_later.add(rid)
                else:
                    self.engine.cancel(rid)
                self._wake.notify()

    def start_draining(self) -> None:
        """Refuse new requests from now on (503); the ones in flight go on."""
        with self._wake:
            self.draining = True

    def abort_all(self, message: str, status: int = 503) -> int:
        """End every request in flight with ``RequestFailed(status, message)``; returns how many."""
        with self._wake:
            routes, self._routes = self._routes, {}
            for rid in routes:
                self.engine.cancel(rid)
            self._wake.notify()
        self._post_failure(routes, RequestFailed(status, message))
        return len(routes)

    @staticmethod
    def draining_error() -> ApiError:
        """The answer to a request that comes while the server drains for shutdown."""
        return ApiError(503, "the server is shutting down and takes no new requests; retry on another replica",
                        kind="server_error", headers={"Retry-After": "1", "Connection": "close"})

    # ---- internals ---------------------------------------------------------------------------------
    def _check_open(self, n: int) -> None:
        retry = {"Retry-After": "1"}
        if self.draining:
            raise self.draining_error()
        if self.state not in ("ok", "restarting"):
            raise ApiError(503, f"the engine failed and could not be restarted ({self.error!r}); the server is "
                                "exiting", kind="server_error")
        if len(self._routes) + n > self.capacity:
            raise ApiError(429, f"the server is at capacity: {len(self._routes)} requests running or queued, at "
                                f"most {self.capacity} ({self.engine.num_slots} KV slots + a queue of "
                                f"{self.max_queue}); retry later", kind="rate_limit_error", headers=retry)

    @staticmethod
    def _post(target: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item: object) -> None:
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the server's event loop has closed: nobody is waiting for this event
            pass

    def _post_failure(self, routes: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]],
                      failure: RequestFailed) -> None:
        for rid, target in routes.items():
            self._post(target, (rid, failure))

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.engine.has_work:
                    self._wake.wait()
                if self._stop:
                    return
                engine = self.engine
            try:
                events = engine.step()
            except Exception as exc:  # noqa: BLE001 - any failure of a step is recovered the same way
                if not self._recover(exc):
                    return
                continue
            for ev in events:
                with self._wake:
                    target = self._routes.get(ev.request_id)
                    if ev.finish_reason is not None:
                        self._routes.pop(ev.request_id, None)
                if target is not None:
                    self._post(target, (ev.request_id, ev))

    def _recover(self, exc: Exception) -> bool:
        """Fail the started requests of a failed engine, rebuild it and re-queue the others; False if
        the rebuild failed too."""
        log.error("lowbit: the engine failed; failing its requests and rebuilding it", exc_info=exc)
        old = self.engine
        try:
            unstarted = old.unstarted()
        except Exception:  # noqa: BLE001 - its state may be anything: then none is re-queued
            unstarted = []
        with self._wake:
            self.error = exc
            self.state = "restarting"
            self._held = [u for u in unstarted if u[0] in self._routes]
            keep = {u[0] for u in self._held}
            failed = {rid: t for rid, t in self._routes.items() if rid not in keep}
            self._routes = {rid: t for rid, t in self._routes.items() if rid in keep}
        self._post_failure(failed, RequestFailed(500, f"the engine failed while running this request "
                                                      f"({type(exc).__name__}: {exc}); it was restarted, retry"))
        try:
            old.close()
            new = self._rebuild(old)
        except Exception as fatal:  # noqa: BLE001 - reported to on_fatal, which ends the process
            log.critical("lowbit: the engine could not be rebuilt; the server cannot go on", exc_info=fatal)
            with self._wake:
                self.error, self.state = fatal, "failed"
                routes, self._routes = self._routes, {}
            self._post_failure(routes, RequestFailed(503, f"the engine could not be restarted ({fatal!r})"))
            if self.on_fatal is not None:
                self.on_fatal(fatal)
            return False
        with self._wake:
            new.continue_ids(old)  # past the ids reserved during the rebuild
            for rid, prompt, params in self._held:
                if rid in self._routes:
                    new.add(prompt, params, request_id=rid)
                    if rid in self._cancel_later:
                        new.cancel(rid)
            self._held, self._cancel_later = [], set()
            self.engine, self.state = new, "ok"
            self.restarts += 1
        if self.on_restart is not None:
            self.on_restart()
        return True
