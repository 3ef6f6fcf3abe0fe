"""Running the app: ``run_server`` for ``lowbit serve`` (graceful shutdown, exit codes) and
``BackgroundServer`` for tests and ``lowbit bench serve`` (uvicorn on a thread of this process).

Shutdown, as a supervisor (systemd, Kubernetes) expects it:
- the first SIGTERM or SIGINT starts a *drain*: ``/v1`` routes answer 503 with ``Retry-After`` and
  ``/health`` answers 503, so a load balancer stops sending; requests in flight, streams included, go on;
- once none is left, or after ``drain_timeout_s`` (the rest are then ended with an error event), the
  server closes its connections and ``run_server`` returns 0;
- a second signal stops at once;
- if the engine fails and cannot be rebuilt (``EngineLoop.on_fatal``), the server stops and
  ``run_server`` returns 1, so that a supervisor restarts the process.

uvicorn alone would stop listening at the first signal (new clients get "connection refused", not a
503), and re-raises the signal after its shutdown, so the process would end by SIGTERM, not exit 0.
"""

from __future__ import annotations

import sys
import threading
import time
from functools import lru_cache
from types import FrameType
from typing import Any

from fastapi import FastAPI

from lowbit.errors import LowbitError


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as exc:
        raise LowbitError(f"serving needs uvicorn ({exc}); pip install uvicorn") from exc
    return uvicorn


@lru_cache(maxsize=1)
def _draining_server_class() -> type:
    uvicorn = _uvicorn()

    class DrainingServer(uvicorn.Server):
        """uvicorn's server with a drain on the first signal (module docstring)."""

        def __init__(self, config: Any, drain_timeout_s: float, announce: Any) -> None:
            super().__init__(config)
            self.drain_timeout_s, self.announce = drain_timeout_s, announce
            self.exit_code = 0
            self._drain_thread: threading.Thread | None = None

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and self.announce is not None:
                port = self.servers[0].sockets[0].getsockname()[1]  # the real one when --port 0
                self.announce(port)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # not recorded in _captured_signals: uvicorn would re-raise it after the shutdown and the
            # process would die by the signal instead of exiting 0
            if self._drain_thread is not None:
                print("lowbit: second signal, stopping now", file=sys.stderr, flush=True)
                self.should_exit = self.force_exit = True
                return
            self._drain_thread = threading.Thread(target=self._drain, name="lowbit-drain", daemon=True)
            self._drain_thread.start()

        def _drain(self) -> None:
            loop = self.config.app.state.served.loop if hasattr(self.config.app, "state") else None
            if loop is None:
                self.should_exit = True
                return
            loop.start_draining()
            n = loop.in_flight
            print(f"lowbit: draining: {n} requests in flight, at most {self.drain_timeout_s:g} s "
                  "(a second signal stops now)", file=sys.stderr, flush=True)
            deadline = time.monotonic() + self.drain_timeout_s
            while loop.in_flight and time.monotonic() < deadline:
                time.sleep(0.02)
            if loop.in_flight:
                ended = loop.abort_all(f"the server shut down before this request finished (drain timeout "
                                       f"{self.drain_timeout_s:g} s)")
                print(f"lowbit: drain timeout: ended {ended} requests", file=sys.stderr, flush=True)
                time.sleep(0.2)  # let their error events reach the clients
            self.should_exit = True

        def fail(self, exc: BaseException) -> None:
            """The engine cannot go on: stop, exit code 1."""
            print(f"lowbit: error: the engine failed and could not be rebuilt ({exc!r}); exiting so that a "
                  "supervisor can restart the server", file=sys.stderr, flush=True)
            self.exit_code = 1
            self.should_exit = True

    return DrainingServer


def run_server(app: FastAPI, host: str, port: int, *, drain_timeout_s: float = 30.0,
               announce: Any = None, log_level: str = "warning") -> int:
    """Serve ``app`` until a signal (drained) or a fatal engine failure; returns the exit code (0 or 1).

    ``announce(port)`` is called once the socket listens (with the real port when ``port`` is 0).
    """
    if not drain_timeout_s >= 0:
        raise LowbitError(f"--drain-timeout must be >= 0 seconds, got {drain_timeout_s}")
    uvicorn = _uvicorn()
    # timeout_graceful_shutdown: after our drain, how long uvicorn waits for idle keep-alive connections
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    server = _draining_server_class()(config, drain_timeout_s, announce)
    app.state.served.loop.on_fatal = server.fail
    server.run()
    return server.exit_code


class BackgroundServer:
    """Serves ``app`` with uvicorn on a daemon thread of this process; ``with`` yields its base URL.

    Port 0 (the default) takes a free port from the OS. For tests and ``lowbit bench serve MODEL``;
    ``lowbit serve`` runs ``run_server`` on the main thread instead. ``drain()`` runs the same drain as
    a SIGTERM to ``lowbit serve`` does (signals reach only the main thread).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0,
                 drain_timeout_s: float = 30.0) -> None:
        self.app, self.host, self.port, self.start_timeout_s = app, host, port, start_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.url = ""

    def __enter__(self) -> str:
        uvicorn = _uvicorn()
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self._server = _draining_server_class()(config, self.drain_timeout_s, None)
        if hasattr(self.app.state, "served"):
            self.app.state.served.loop.on_fatal = self._server.fail
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

    def drain(self) -> None:
        """Start a drain, as SIGTERM does to ``lowbit serve``; ``wait`` for its end."""
        self._server.handle_exit(15, None)

    def wait(self, timeout_s: float) -> bool:
        """Wait for the server to stop; True if it did."""
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    @property
    def exit_code(self) -> int:
        return self._server.exit_code

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
