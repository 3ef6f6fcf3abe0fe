"""What `lowbit serve` accepts and refuses: every limit a clear 4xx (never a 500, never a hang), the
API key, /metrics, and requests shaped as the official `openai` client sends them."""

from __future__ import annotations

import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tests.tiny_models import greedy_text

PROMPT = "w5 w17 w33 w8"


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def _post(url: str, path: str, body=None, **kw) -> httpx.Response:  # noqa: ANN001
    return httpx.post(url + path, json=body, timeout=30, **kw) if body is not None else httpx.post(url + path, timeout=30, **kw)


# ---- item 3: limits and bad input -----------------------------------------------------------------
def test_malformed_json_and_wrong_shapes_are_400(tiny_server):
    url = tiny_server.url
    r = httpx.post(url + "/v1/completions", content=b'{"model": "tiny", "prompt": ', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = _post(url, "/v1/completions", {"model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = _post(url, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_empty_prompts_are_400(tiny_server):
    c = _client(tiny_server.url)
    for prompt in ("", [], [[]], ["w5", ""]):
        with pytest.raises(openai.BadRequestError, match="empty"):
            c.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="empty prompt"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": ""}], max_tokens=2)


def test_out_of_vocabulary_token_ids_are_400(tiny_server):
    c = _client(tiny_server.url)
    for ids in ([5, 97], [-1, 5], [5, 10**12]):
        with pytest.raises(openai.BadRequestError, match=r"outside this model's vocabulary \[0, 97\)"):
            c.completions.create(model="tiny", prompt=ids, max_tokens=2)


def test_context_overflow_names_both_numbers(tiny_server):
    c = _client(tiny_server.url)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=10**9)
    msg = e.value.body["message"]
    assert "context is 64 tokens" in msg and "4 in the prompt" in msg and f"{10**9} in max_tokens" in msg
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="at most 60"):
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=61)
    # exactly the context is fine, and runs to its end
    r = c.completions.create(model="tiny", prompt=[5, 17, 33, 8], max_tokens=60, temperature=0)
    assert r.usage.completion_tokens <= 60
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                  max_completion_tokens=1000)


@pytest.mark.parametrize("param, value", [("n", 2), ("best_of", 3), ("logprobs", 2), ("echo", True),
                                          ("suffix", "w5"), ("presence_penalty", 0.5), ("frequency_penalty", 1.0),
                                          ("logit_bias", {"5": 10})])
def test_unsupported_completion_parameters_are_named(tiny_server, param, value):
    c = _client(tiny_server.url)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, **{param: value})
    assert e.value.body["param"] == param and f"'{param}'" in e.value.body["message"]


def test_unsupported_chat_parameters_and_unknown_fields_are_named(tiny_server):
    c = _client(tiny_server.url)
    msgs = [{"role": "user", "content": PROMPT}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for kw, param in [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"tools": [tool]}, "tools"),
                      ({"response_format": {"type": "json_object"}}, "response_format"),
                      ({"extra_body": {"mirostat": 2}}, "mirostat")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, **kw)
        assert e.value.body["param"] == param, kw
    # defaults a client sends explicitly are accepted
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, n=1, presence_penalty=0,
                                  frequency_penalty=0, logprobs=False, user="u1", temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_roles_and_content_parts(tiny_server):
    c, url = _client(tiny_server.url), tiny_server.url
    r = _post(url, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                             "messages": [{"role": "tool", "content": "w5"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0")
    r = _post(url, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    r = _post(url, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                             "messages": [{"role": "user", "content": [image]}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.content")
    # text parts and the developer role are what newer clients send: same answer as a plain string
    parts = [{"type": "text", "text": "w5 w17"}, {"type": "text", "text": " w33 w8"}]
    a = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=6,
                                  temperature=0)
    b = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=6,
                                  temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    d = c.chat.completions.create(model="tiny", messages=[{"role": "developer", "content": "w9"},
                                                          {"role": "user", "content": PROMPT}], max_tokens=4,
                                  temperature=0)
    assert d.choices[0].message.content == greedy_text(tiny_server.loaded, "w9 " + PROMPT + " ", 4)


def test_body_size_limit_is_413(serve_tiny):
    with serve_tiny(max_body_bytes=2048) as s:
        big = {"model": "tiny", "prompt": "w5 " * 2000, "max_tokens": 2}
        r = _post(s.url, "/v1/completions", big)
        assert r.status_code == 413 and "2048 bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit holds while the body streams in
            for _ in range(10):
                yield b" " * 1000

        r = httpx.post(s.url + "/v1/completions", content=chunks(), timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert _client(s.url).completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices


def _wait_for(cond, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_server_answers_429_with_retry_after(serve_tiny, monkeypatch):
    with serve_tiny(slots=1, max_len=64, max_queue=1) as s:
        gate = threading.Event()  # the engine waits here, so the server stays full while we look
        step = s.engine.step
        monkeypatch.setattr(s.engine, "step", lambda: (gate.wait(30), step())[1])
        c = _client(s.url)
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0))) for _ in range(2)]
        for t in threads:
            t.start()
        _wait_for(lambda: s.served.loop.in_flight == 2)  # one for the slot, one queued: full
        r = _post(s.url, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "at capacity" in r.json()["error"]["message"] and "1 KV slots + a queue of 1" in r.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):  # a streaming request too, before any token
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, stream=True)
        gate.set()
        for t in threads:
            t.join(30)
        assert [x.choices[0].text for x in results] == [greedy_text(s.loaded, PROMPT, 4)] * 2
        _wait_for(lambda: s.served.loop.in_flight == 0)
        assert c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices


# ---- item 4: who may use it -------------------------------------------------------------------------
def test_api_key_guards_every_v1_route(serve_tiny):
    with serve_tiny(api_key="s3cret-key") as s:
        for key in ("wrong", "s3cret-ke", "s3cret-key-and-more"):
            with pytest.raises(openai.AuthenticationError):
                _client(s.url, key).models.list()
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT},
                       headers={"Authorization": "Basic s3cret-key"})
        assert r.status_code == 401
        good = _client(s.url, "s3cret-key")
        assert [m.id for m in good.models.list().data] == ["tiny"]
        assert good.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key
        assert httpx.get(s.url + "/metrics").status_code == 200


def test_api_key_comes_from_the_environment(monkeypatch, tiny_model_path):
    from lowbit.cli import build_parser

    args = build_parser().parse_args(["serve", str(tiny_model_path)])
    assert args.api_key is None and args.host == "127.0.0.1"  # default bind: this machine only
    monkeypatch.setenv("LOWBIT_API_KEY", "from-env")
    captured = {}

    def fake_run(app, host, port, **kw):  # noqa: ANN001, ANN003
        captured["key"], captured["names"] = app.state.served.api_key, app.state.served.names
        return 0

    monkeypatch.setattr("lowbit.serve.runner.run_server", fake_run)
    from lowbit.cli import main

    assert main(["serve", str(tiny_model_path), "--device", "cpu", "--dtype", "fp32", "--max-len", "64"]) == 0
    assert captured == {"key": "from-env", "names": (str(tiny_model_path),)}


# ---- item 5: /metrics -------------------------------------------------------------------------------
def _metric(text: str, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in /metrics")


def test_metrics_count_requests_tokens_and_latencies(serve_tiny):
    with serve_tiny(slots=2) as s:
        c = _client(s.url)
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0)
        list(c.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, stream=True))
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
        m = httpx.get(s.url + "/metrics")
        assert m.headers["content-type"].startswith("text/plain")
        text = m.text
        assert _metric(text, "lowbit_requests_total", 'route="/v1/completions",status="200"') == 2
        assert _metric(text, "lowbit_requests_total", 'route="/v1/completions",status="404"') == 1
        assert _metric(text, "lowbit_prompt_tokens_total") == 8
        gen = _metric(text, "lowbit_generation_tokens_total")
        assert 2 <= gen <= 10
        assert _metric(text, "lowbit_time_to_first_token_seconds_count") == 2
        assert _metric(text, "lowbit_inter_token_latency_seconds_count") == gen - 2
        assert _metric(text, "lowbit_request_duration_seconds_count") == 2
        assert _metric(text, "lowbit_kv_slots") == 2 and _metric(text, "lowbit_kv_slots_used") == 0
        assert _metric(text, "lowbit_requests_waiting") == 0 and _metric(text, "lowbit_requests_running") == 0
        assert _metric(text, "lowbit_engine_restarts_total") == 0


def test_metrics_see_slots_and_queue_while_busy(serve_tiny, monkeypatch):
    with serve_tiny(slots=1, max_queue=4) as s:
        gate, steps = threading.Event(), []
        step = s.engine.step

        def gated():  # the first step admits a request into the slot; then the engine waits
            if steps:
                gate.wait(30)
            steps.append(1)
            return step()

        monkeypatch.setattr(s.engine, "step", gated)
        c = _client(s.url)
        threads = [threading.Thread(target=c.completions.create,
                                    kwargs=dict(model="tiny", prompt=PROMPT, max_tokens=3)) for _ in range(3)]
        for t in threads:
            t.start()
        _wait_for(lambda: s.served.loop.in_flight == 3 and s.engine.stats().slots_used == 1)
        text = httpx.get(s.url + "/metrics").text
        assert _metric(text, "lowbit_kv_slots_used") == 1
        assert _metric(text, "lowbit_requests_running") + _metric(text, "lowbit_requests_waiting") == 3
        gate.set()
        for t in threads:
            t.join(30)
        text = httpx.get(s.url + "/metrics").text
        assert _metric(text, "lowbit_kv_slots_used") == 0 and _metric(text, "lowbit_requests_waiting") == 0


# ---- item 10: what OpenAI clients send ------------------------------------------------------------
def test_the_model_id_is_the_name_given_on_the_command_line(tiny_model_path):
    from lowbit.serve.app import load_app

    app = load_app(str(tiny_model_path), device="cpu", dtype="fp32", max_len=64, max_slots=1)
    assert app.state.served.names == (str(tiny_model_path),)
    app = load_app(tiny_model_path, device="cpu", dtype="fp32", max_len=64, max_slots=1, name=["a", "b"])
    assert app.state.served.names == ("a", "b")


def test_aliases_are_all_served(serve_tiny):
    with serve_tiny(name=["smollm2-135m", "tiny"]) as s:
        c = _client(s.url)
        assert [m.id for m in c.models.list().data] == ["smollm2-135m", "tiny"]
        r = c.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=2)
        assert r.model == "smollm2-135m"
        with pytest.raises(openai.NotFoundError, match="'smollm2-135m', 'tiny'"):
            c.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", prompt=PROMPT, max_tokens=2)


def test_completions_take_token_ids_and_arrays_of_prompts(tiny_server):
    c, loaded = _client(tiny_server.url), tiny_server.loaded
    prompts = [PROMPT, "w40 w41 w42"]
    ids = [loaded.tokenizer(p)["input_ids"] for p in prompts]
    by_text = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    by_ids = c.completions.create(model="tiny", prompt=ids[0], max_tokens=6, temperature=0).choices[0].text
    assert by_ids == by_text == greedy_text(loaded, PROMPT, 6)
    for batch in (prompts, ids):
        r = c.completions.create(model="tiny", prompt=batch, max_tokens=6, temperature=0)
        assert [ch.index for ch in r.choices] == [0, 1]
        assert [ch.text for ch in r.choices] == [greedy_text(loaded, p, 6) for p in prompts]
        assert r.usage.prompt_tokens == sum(len(i) for i in ids)
    streamed = c.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    texts, usage = {0: "", 1: ""}, None
    for chunk in streamed:
        for ch in chunk.choices:
            texts[ch.index] += ch.text
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [greedy_text(loaded, p, 6) for p in prompts]
    assert usage is not None and usage.prompt_tokens == sum(len(i) for i in ids)


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(tiny_server):
    c = _client(tiny_server.url)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 64
    assert r.choices[0].finish_reason == "stop" or r.usage.prompt_tokens + r.usage.completion_tokens == 64


def test_null_sampling_fields_mean_the_defaults(tiny_server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": None, "top_p": None, "seed": 5}
    a, b = (_post(tiny_server.url, "/v1/completions", body).json() for _ in range(2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]  # seeded sampling at temperature 1
