"""The load test (``lowbit bench serve``) against a real server on loopback with a tiny model: every
request completes and equals its prompt run alone; failures (nothing listening, a server that never
answers) are reported with their messages, quickly, and fail the run."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

pytest.importorskip("httpx")

from lowbit.bench.load import (
    LoadConfig,
    LoadReport,
    RequestResult,
    add_arguments,
    first_difference,
    format_report,
    main,
    percentile,
    run_load,
)
from lowbit.errors import LowbitError
from lowbit.serve.runner import BackgroundServer
from tests.tiny_models import greedy_text

# distinct prompts in the tiny tokenizer's vocabulary ("w3".."w96"), of 2 to 9 tokens
PROMPTS = [" ".join(f"w{3 + (7 * i + 11 * j) % 90}" for j in range(2 + i)) for i in range(8)]


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture
def unused_port():
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_request_completes_and_equals_its_alone_run(tiny_server):
    cfg = LoadConfig(url=tiny_server.url + "/v1", clients=4, requests=12, max_tokens=8, timeout_s=60,
                     prompts=PROMPTS)
    r = asyncio.run(run_load(cfg))
    assert r.model == "tiny"  # found through /v1/models
    assert (r.sent, r.completed, r.failed, r.not_sent) == (12, 12, 0, 0), format_report(r)
    # the reference itself is right: each alone run is the model's greedy continuation
    assert [a["text"] for a in r.alone] == [greedy_text(tiny_server.loaded, p, 8) for p in PROMPTS]
    assert all(x.equals_alone for x in r.results) and not r.mixed_up and not r.drifted
    assert [x.prompt for x in r.results] == [i % len(PROMPTS) for i in range(12)]
    for p50, p99 in [(r.ttft_p50_s, r.ttft_p99_s), (r.latency_p50_s, r.latency_p99_s), (r.itl_p50_s, r.itl_p99_s)]:
        assert 0 < p50 <= p99
    assert r.output_tokens > 0 and r.tokens_per_s > 0 and r.requests_per_s > 0 and r.wall_s > 0
    assert r.passed and format_report(r).endswith("PASS")
    assert json.loads(json.dumps(r.to_json()))["passed"] is True


def test_chat_streams(tiny_server):
    cfg = LoadConfig(url=tiny_server.url, model="tiny", clients=2, requests=4, max_tokens=6, timeout_s=60,
                     prompts=PROMPTS[:3], chat=True)
    r = asyncio.run(run_load(cfg))
    assert r.endpoint == "/v1/chat/completions" and r.completed == 4 and r.passed, format_report(r)
    assert r.alone[0]["text"] == greedy_text(tiny_server.loaded, PROMPTS[0] + " ", 6)  # the chat template adds " "


def test_nothing_listening_fails_every_request_with_its_error(unused_port, tmp_path, capsys):
    url = f"http://127.0.0.1:{unused_port}"
    r = asyncio.run(run_load(LoadConfig(url=url, model="tiny", clients=2, requests=3, max_tokens=4, timeout_s=10,
                                        prompts=PROMPTS[:2])))
    assert (r.sent, r.completed, r.failed) == (3, 0, 3) and r.alone_failed == 2 and not r.passed
    assert all(x.error and "ConnectError" in x.error for x in r.results)
    assert r.ttft_p50_s is None and r.tokens_per_s == 0
    out = tmp_path / "load.json"
    assert main(_args("--url", url, "--model-name", "tiny", "--requests", "2", "--timeout", "10",
                      "--json", str(out))) == 1
    printed = capsys.readouterr().out
    assert "ConnectError" in printed and printed.endswith("FAIL\n")
    assert json.loads(out.read_text())["failed"] == 2
    with pytest.raises(LowbitError, match="is a server running there"):  # no model name to ask the server for
        main(_args("--url", url))


def test_a_server_that_never_answers_is_bounded_in_time():
    with socket.socket() as s:  # listens, never accepts: connections wait in the backlog
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        cfg = LoadConfig(url=f"http://127.0.0.1:{s.getsockname()[1]}", model="tiny", requests=5, timeout_s=0.5,
                         prompts=PROMPTS[:2])
        r = asyncio.run(run_load(cfg))
    assert r.sent == 0 and r.not_sent == 5 and not r.passed
    assert all("time bound of 0.5 s ran out" in a["error"] for a in r.alone)


def test_options_are_checked():
    with pytest.raises(LowbitError, match="either MODEL"):
        main(_args())
    with pytest.raises(LowbitError, match="either MODEL"):
        main(_args("some-model", "--url", "http://127.0.0.1:1"))
    with pytest.raises(LowbitError, match=">= 1"):
        LoadConfig(url="http://x", clients=0)


def _faulty_app():  # FastAPI and Request are imported at module level: FastAPI resolves annotations there
    """An OpenAI-like app whose streams go wrong: prompt "a" streams another prompt's answer (mixed up),
    prompt "b" its own answer with a late difference (drift); non-streamed answers are right."""
    app = FastAPI()
    right = {"a": "the answer to a is long enough", "b": "the answer to b is long enough"}
    streamed = {"a": "another prompt's answer", "b": "the answer to b is long enougH"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if not body["stream"]:
            return {"choices": [{"index": 0, "text": right[body["prompt"]], "finish_reason": "length"}]}

        async def sse():
            for word in streamed[body["prompt"]].split(" "):
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": word + " "}]}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def test_a_mixed_up_response_fails_and_drift_is_reported():
    with BackgroundServer(_faulty_app()) as url:
        r = asyncio.run(run_load(LoadConfig(url=url, model="m", clients=2, requests=4, timeout_s=10,
                                            prompts=["a", "b"])))
    assert r.completed == 4 and not r.passed
    assert [x.prompt for x in r.mixed_up] == [0, 0] and {x.first_diff for x in r.mixed_up} == {0}
    assert [x.prompt for x in r.drifted] == [1, 1] and {x.first_diff for x in r.drifted} == {29}


def test_mixed_up_and_drift_are_told_apart():
    assert first_difference("abc", "abc") is None
    assert first_difference("abc", "abd") == 2 and first_difference("ab", "abc") == 2 and first_difference("", "a") == 0
    assert percentile([], 50) is None and percentile([3.0], 99) == 3.0 and percentile([1.0, 2.0, 3.0], 50) == 2.0
    results = [RequestResult(0, 0, "x", equals_alone=False, first_diff=0),
               RequestResult(1, 0, "y" * 40, equals_alone=False, first_diff=30),
               RequestResult(2, 0, "z", equals_alone=True)]
    r = LoadReport(url="u", model="m", endpoint="/v1/completions", clients=1, max_tokens=8, mixup_chars=8,
                   requested=3, sent=3, completed=3, failed=0, wall_s=1.0, output_tokens=3, tokens_per_s=3.0,
                   requests_per_s=3.0, ttft_p50_s=None, ttft_p99_s=None, latency_p50_s=None, latency_p99_s=None,
                   itl_p50_s=None, itl_p99_s=None, alone=[{"text": "a", "latency_s": 0.1, "error": None}],
                   results=results)
    assert [x.index for x in r.mixed_up] == [0] and [x.index for x in r.drifted] == [1] and not r.passed
    text = format_report(r)
    assert "1 drift (first differences at characters [30]), 1 mixed up" in text and "request 0" in text
    r.results = results[1:]
    assert r.passed  # drift alone does not fail the run
