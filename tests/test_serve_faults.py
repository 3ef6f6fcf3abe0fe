"""`lowbit serve` under faults: an engine that raises, an engine that cannot be rebuilt, shutdown by
drain (in-process and by SIGTERM to a real `lowbit serve` process). No request may hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tests.tiny_models import greedy_text

PROMPT = "w5 w17 w33 w8"


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _wait_for(cond, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class _Fault:
    """Makes ``engine.step`` raise once, at its ``at``-th call from now."""

    def __init__(self, engine, at: int = 1, exc: Exception | None = None) -> None:  # noqa: ANN001
        self.calls, self.at = 0, at
        self.exc = exc or RuntimeError("injected fault: CUDA error: an illegal memory access was encountered")
        self._step = engine.step
        engine.step = self

    def __call__(self):  # noqa: ANN204
        self.calls += 1
        if self.calls == self.at:
            raise self.exc
        return self._step()


def test_an_engine_fault_fails_its_requests_with_500_and_the_engine_is_rebuilt(serve_tiny):
    with serve_tiny(slots=2) as s:
        c = _client(s.url)
        old = s.engine
        _Fault(old, at=2)  # a request is admitted and prefilled, then the engine fails
        with pytest.raises(openai.InternalServerError, match="injected fault") as e:
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
        assert e.value.body["type"] == "server_error" and "RuntimeError" in e.value.body["message"]
        _wait_for(lambda: s.served.loop.state == "ok" and s.engine is not old)
        health = httpx.get(s.url + "/health").json()
        assert health == {"status": "ok", "restarts": 1}
        assert "lowbit_engine_restarts_total 1.0" in httpx.get(s.url + "/metrics").text
        # the new engine serves, with every slot free, and answers as before
        assert s.engine.stats().slots_used == 0
        r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.choices[0].text == greedy_text(s.loaded, PROMPT, 8)


def test_a_fault_mid_stream_ends_the_stream_with_an_error_event(serve_tiny):
    with serve_tiny(slots=2) as s:
        _Fault(s.engine, at=5)  # after a few tokens were streamed
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            events = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "injected fault" in error["message"] and error["type"] == "server_error"
        texts = [json.loads(e)["choices"][0]["text"] for e in events[:-2]]
        assert texts and greedy_text(s.loaded, PROMPT, 40).startswith("".join(texts))
        with pytest.raises(openai.APIError, match="injected fault"):  # what the official client raises
            _Fault(s.engine, at=3)
            list(_client(s.url).completions.create(model="tiny", prompt=PROMPT, max_tokens=40, stream=True,
                                                           temperature=0))


def test_only_started_requests_fail_queued_ones_move_to_the_new_engine(serve_tiny, monkeypatch):
    with serve_tiny(slots=1, max_queue=8) as s:
        gate = threading.Event()
        old = s.engine
        fault = _Fault(old, at=2)  # step 1 admits one request into the only slot; step 2 fails
        inner = old.step
        monkeypatch.setattr(old, "step", lambda: (gate.wait(30), inner())[1])
        c = _client(s.url)
        outcomes: dict[int, str] = {}

        def ask(i: int) -> None:
            try:
                outcomes[i] = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
            except openai.APIStatusError as exc:
                outcomes[i] = str(exc.status_code)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        _wait_for(lambda: s.served.loop.in_flight == 4)
        gate.set()
        for t in threads:
            t.join(30)
        assert fault.calls >= 2
        assert sorted(outcomes.values()) == ["500"] + [greedy_text(s.loaded, PROMPT, 20)] * 3, outcomes
        _wait_for(lambda: s.served.loop.in_flight == 0 and s.engine.stats().slots_used == 0)


def test_requests_that_arrive_during_a_rebuild_wait_for_the_new_engine(serve_tiny):
    with serve_tiny(slots=2) as s:
        loop = s.served.loop
        loop._rebuild = lambda old: (time.sleep(1.0), old.rebuilt())[1]  # as slow as capturing CUDA graphs
        _Fault(s.engine, at=2)
        c = _client(s.url)
        first = threading.Thread(target=lambda: pytest.raises(openai.InternalServerError, c.completions.create,
                                                              model="tiny", prompt=PROMPT, max_tokens=8, temperature=0))
        first.start()
        _wait_for(lambda: loop.state == "restarting")
        assert httpx.get(s.url + "/health").json()["status"] == "restarting"
        r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)  # held, then served
        assert r.choices[0].text == greedy_text(s.loaded, PROMPT, 8) and loop.restarts == 1
        first.join(10)
        _wait_for(lambda: loop.in_flight == 0)


def test_an_engine_that_cannot_be_rebuilt_ends_the_server_with_exit_code_1(serve_tiny):
    with serve_tiny(slots=2) as s:
        loop = s.served.loop

        def broken(old):  # noqa: ANN001, ANN202
            raise RuntimeError("CUDA error: the context is poisoned")

        loop._rebuild = broken
        _Fault(s.engine, at=2)  # after the request was admitted
        with pytest.raises(openai.InternalServerError, match="injected fault"):
            _client(s.url).completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
        assert s.background.wait(15), "the server did not stop"
        assert s.background.exit_code == 1 and loop.state == "failed"


def test_drain_finishes_what_runs_refuses_what_comes_and_exits_0(serve_tiny, monkeypatch):
    with serve_tiny(slots=2, drain_timeout_s=30) as s:
        gate = threading.Event()
        step = s.engine.step
        monkeypatch.setattr(s.engine, "step", lambda: (gate.wait(30), step())[1])
        c = _client(s.url)
        got = []
        t = threading.Thread(target=lambda: got.append(
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)))
        t.start()
        _wait_for(lambda: s.served.loop.in_flight == 1)
        s.background.drain()
        _wait_for(lambda: s.served.loop.draining)
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert httpx.get(s.url + "/health").json() == {"status": "draining"}
        gate.set()
        t.join(30)
        assert got and got[0].choices[0].text == greedy_text(s.loaded, PROMPT, 6)
        assert s.background.wait(15) and s.background.exit_code == 0


def test_drain_timeout_ends_the_requests_left_with_an_error(serve_tiny, monkeypatch):
    with serve_tiny(slots=2, drain_timeout_s=0.5) as s:
        step = s.engine.step
        monkeypatch.setattr(s.engine, "step", lambda: (time.sleep(0.05), step())[1])  # ~1 s for 20 tokens
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 50, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            s.background.drain()
            events = [line[5:].strip() for line in lines if line.startswith("data:")]
        assert events[-1] == "[DONE]" and "drain timeout" in json.loads(events[-2])["error"]["message"]
        assert s.background.wait(15) and s.background.exit_code == 0


def _serve(model_dir, *extra: str) -> tuple[subprocess.Popen, str]:  # noqa: ANN001
    """`lowbit serve` in a child process on a free port; returns it and its base URL."""
    cmd = [sys.executable, "-m", "lowbit.cli", "serve", str(model_dir), "--port", "0", "--device", "cpu",
           "--dtype", "fp32", "--max-slots", "2", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"lowbit serve exited with {proc.returncode}")
        if line.startswith("[serving"):
            url = line.split(" at ", 1)[1].split("/v1", 1)[0]
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, url
    proc.kill()
    raise AssertionError("lowbit serve did not start")


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    from tests.conftest import tiny_model_dir

    path = tmp_path_factory.mktemp("long")
    tiny_model_dir(path, max_position_embeddings=4096)
    return path


def test_sigterm_drains_then_exits_0(long_context_model):
    proc, url = _serve(long_context_model, "--drain-timeout", "60")
    try:
        body = {"model": str(long_context_model), "prompt": PROMPT, "max_tokens": 1500, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            refused = httpx.post(url + "/v1/completions", json={"model": str(long_context_model), "prompt": PROMPT},
                                 timeout=10)
            events = [line[5:].strip() for line in lines if line.startswith("data:")]
        assert refused.status_code == 503
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(60) == 0
    finally:
        proc.kill()


def test_sigterm_on_an_idle_server_exits_0_at_once(tiny_model_path):
    proc, url = _serve(tiny_model_path, "--name", "tiny")
    try:
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0 and time.monotonic() - t0 < 10
    finally:
        proc.kill()


def test_fault_and_load(serve_tiny, capsys):
    """Item 7 of the reliability issue: 32 concurrent streaming clients, a quarter of them hanging up
    mid-stream, one bad request of each kind mixed in, and an engine fault injected mid-load. Then: no
    request hung, every bad request got its 4xx, every completed response equals its prompt run alone,
    the only failures are the fault's, the server still answers, and every KV slot is free again."""
    import asyncio

    from lowbit.bench.load import LoadConfig, format_summary, run_load
    from lowbit.bench.load_faults import after_ok
    from tests.test_load import PROMPTS

    with serve_tiny(slots=8, max_len=64, max_queue=64, max_body_bytes=1 << 20) as s:
        loop = s.served.loop

        def inject() -> None:  # once the load runs (not during the alone pass): fail a step
            _wait_for(lambda: loop.in_flight >= 16, timeout_s=60)
            _Fault(loop.engine, at=2)

        injector = threading.Thread(target=inject, daemon=True)
        injector.start()
        cfg = LoadConfig(url=s.url, model="tiny", clients=32, requests=256, max_tokens=16, timeout_s=120,
                         prompts=PROMPTS, disconnect_share=0.25, bad_requests=True, max_body_bytes=1 << 20,
                         expected_error="injected fault")
        r = asyncio.run(run_load(cfg))
        injector.join(1)
        summary = format_summary(r)
        with capsys.disabled():
            print("\n" + summary)
        assert r.not_sent == 0 and not any("time bound" in (x.error or "") for x in r.results), summary
        assert r.failed_expected > 0 and r.failed == r.failed_expected, summary  # the fault hit; nothing else failed
        assert r.disconnected > 0 and r.completed > 0 and r.disconnected + r.completed + r.failed == 256, summary
        assert all(x.equals_alone for x in r.results if x.error is None and not x.hangs_up), summary
        assert len(r.bad) == 12 and all(b["ok"] for b in r.bad), r.bad
        assert after_ok(r.after) and r.after["slots"] == 8, r.after
        assert loop.restarts == 1 and loop.state == "ok" and r.passed
