"""The fault side of the load test (``lowbit bench serve --bad-requests --disconnect-share F``): bad
requests mixed into the load, each with the status it must get, and the server's state after the load.

Each bad request is one a real client sends by mistake; the server must answer it with its 4xx (never
a 500, never a hang) while the load runs, and go on serving. After the load the server must still
answer (``/health`` ok, a new request equals its alone run) and hold no request: every KV slot free
and nothing queued, read from ``/metrics`` (so this works against any lowbit server, local or not).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_BODY_BYTES = 4 << 20  # lowbit serve's default --max-body-mb 4


@dataclass(frozen=True)
class BadRequest:
    name: str
    status: int  # the status the server must answer
    body: dict | bytes  # a JSON body, or raw bytes sent as application/json
    path: str = "/v1/completions"


def bad_requests(model: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> list[BadRequest]:
    """One of each kind of bad request ``lowbit serve`` refuses (``lowbit.serve.protocol``)."""
    ok = {"model": model, "prompt": "hello", "max_tokens": 4}
    chat = {"model": model, "max_tokens": 4}
    return [
        BadRequest("malformed JSON", 400, b'{"model": "' + model.encode() + b'", "prompt": '),
        BadRequest("empty prompt", 400, ok | {"prompt": ""}),
        BadRequest("max_tokens past the context", 400, ok | {"max_tokens": 10**9}),
        BadRequest("n > 1", 400, ok | {"n": 2}),
        BadRequest("logprobs", 400, ok | {"logprobs": 5}),
        BadRequest("token id outside the vocabulary", 400, ok | {"prompt": [2**31 - 1]}),
        BadRequest("negative temperature", 400, ok | {"temperature": -1}),
        BadRequest("unknown parameter", 400, ok | {"mirostat_tau": 5.0}),
        BadRequest("chat role 'tool'", 400, chat | {"messages": [{"role": "tool", "content": "hi"}]},
                   "/v1/chat/completions"),
        BadRequest("chat without messages", 400, chat | {"messages": []}, "/v1/chat/completions"),
        BadRequest("unknown model", 404, ok | {"model": model + "-not-served"}),
        BadRequest("body over the limit", 413, json.dumps(ok | {"prompt": "a" * max_body_bytes}).encode()),
    ]


async def send_bad(client: Any, bad: BadRequest) -> dict:
    """Send one bad request; what it got (``ok`` when the status is the expected one)."""
    t0 = time.perf_counter()
    try:
        if isinstance(bad.body, bytes):
            resp = await client.post(bad.path, content=bad.body, headers={"content-type": "application/json"})
        else:
            resp = await client.post(bad.path, json=bad.body)
        status, error = resp.status_code, None
    except Exception as exc:  # noqa: BLE001 - reported: a bad request must get an answer, not an exception
        status, error = None, f"{type(exc).__name__}: {exc}"
    return {"name": bad.name, "expected": bad.status, "status": status, "ok": status == bad.status,
            "error": error, "seconds": time.perf_counter() - t0}


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def server_after(client: Any, ask_alone: Any, expected_text: str | None, settle_s: float = 10.0) -> dict:
    """The server after the load: its health, whether a new request equals its alone run
    (``ask_alone()`` returns the text), and its KV slots and queue from ``/metrics``, waited for up to
    ``settle_s`` (cancelled requests free their slots at the engine's next step)."""
    out: dict[str, Any] = {"health": None, "answers": False, "slots_used": None, "slots": None, "queued": None}
    try:
        out["health"] = (await client.get("/health")).status_code
        text = await ask_alone()
        out["answers"] = expected_text is not None and text == expected_text
    except Exception as exc:  # noqa: BLE001 - reported in the summary
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    deadline = time.monotonic() + settle_s
    while True:
        try:
            resp = await client.get("/metrics")
        except Exception as exc:  # noqa: BLE001
            out["error"] = f"/metrics: {type(exc).__name__}: {exc}"
            return out
        if resp.status_code != 200:
            return out  # not a lowbit server: slots unknown
        m = resp.text
        out["slots_used"] = _metric(m, "lowbit_kv_slots_used")
        out["slots"] = _metric(m, "lowbit_kv_slots")
        out["queued"] = (_metric(m, "lowbit_requests_waiting") or 0) + (_metric(m, "lowbit_requests_running") or 0)
        if (out["slots_used"] == 0 and out["queued"] == 0) or time.monotonic() > deadline:
            return out
        await asyncio.sleep(0.05)


def after_ok(after: dict | None) -> bool:
    """The server answered after the load and holds nothing (slots unknown count as held)."""
    return after is not None and after.get("health") == 200 and after.get("answers") is True \
        and after.get("slots_used") == 0 and after.get("queued") == 0
