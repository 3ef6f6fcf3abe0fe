"""The OpenAI-compatible server, started on loopback with a tiny model (``tiny_server`` in conftest.py),
exercised with the `openai` client: models, completions and chat (streamed and not), errors as 4xx
JSON, disconnect cancels."""

from __future__ import annotations

import threading
import time

import pytest

openai = pytest.importorskip("openai")

from tests.tiny_models import greedy_text

PROMPT = "w5 w17 w33 w8"


@pytest.fixture
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(tiny_server, client):
    import httpx

    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(tiny_server.url + "/health").json()["status"] == "ok"


def test_completion_is_the_greedy_generation(tiny_server, client):
    loaded = tiny_server.loaded
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.choices[0].text == greedy_text(loaded, PROMPT, 10)
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens <= 10
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_streamed_and_not(tiny_server, client):
    msgs = [{"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text == greedy_text(tiny_server.loaded, PROMPT + " ", 8)
    parts = [c.choices[0].delta.content or "" for c in
             client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True)]
    assert "".join(parts) == text


def test_concurrent_requests_get_their_own_answers(tiny_server, client):
    prompts = [f"w{i} w{i + 1} w{i + 2}" for i in (3, 20, 40, 60)]
    results = {}

    def ask(p):
        results[p] = client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in prompts:  # 4 clients on 2 slots: some waited, none got another's tokens
        assert results[p] == greedy_text(tiny_server.loaded, p, 6), p


def test_bad_requests_get_4xx_and_the_server_keeps_serving(client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-9", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="invalid request"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="invalid request"):
        client.completions.create(model="tiny", prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="context is 64"):
        client.completions.create(model="tiny", prompt=" ".join(["w5"] * 80), max_tokens=4)
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text


def test_disconnect_cancels_the_request(tiny_server):
    import httpx

    engine, url = tiny_server.engine, tiny_server.url
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        next(r.iter_lines())  # one event, then hang up
    for _ in range(100):
        if not engine.has_work:
            break
        time.sleep(0.05)
    assert not engine.has_work and engine.stats().slots_used == 0  # the slot came back


def test_a_non_streaming_client_that_leaves_cancels_its_request(serve_tiny, monkeypatch):
    import httpx

    with serve_tiny(slots=1, max_len=64) as s:
        step = s.engine.step
        monkeypatch.setattr(s.engine, "step", lambda: (time.sleep(0.05), step())[1])  # 58 tokens: ~3 s
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 58, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(s.url + "/v1/completions", json=body, timeout=0.3)
        t0 = time.monotonic()
        while s.served.loop.in_flight and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert s.served.loop.in_flight == 0 and time.monotonic() - t0 < 2.5  # cancelled, not run to its end
        for _ in range(100):
            if s.engine.stats().slots_used == 0:
                break
            time.sleep(0.02)
        assert s.engine.stats().slots_used == 0
