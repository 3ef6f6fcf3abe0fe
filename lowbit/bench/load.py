"""Load test of a running OpenAI-compatible server (``lowbit bench serve``), on loopback.

N clients each send streaming greedy requests back to back (a closed loop: at most N in flight) until R
were sent. Each request's time to first token (TTFT), end-to-end latency and inter-token latencies
(ITL) are measured on the client with ``time.perf_counter``. Before the load, every distinct prompt is
run once alone (one request at a time, not streamed); that is the reference each streamed response
must equal, and it also warms the server (first-call compilation stays out of the load's timings).

A response that differs from its alone run within its first ``MIXUP_CHARS`` characters is *mixed up*
(another request's tokens, or a corrupted KV slot, show from the first token on) and fails the test.
A later difference is *drift*: batched GPU kernels round differently from batch 1, and once a
near-tie between two tokens flips, greedy decoding follows another path. Drift is reported, not
failed. A near-tie within the first token would be reported as mixed up: inspect the texts (--json).

Tokens are counted as streamed chunks (``lowbit serve`` sends one per generated token, the stop token
included). ITL is what a client sees: chunks that reach it in one read (the server's event loop or the
network delivering several at once) show gaps of microseconds, so its p50 can sit far below the
engine's step time. With MODEL the server runs in this process and shares its GIL with the client;
for undisturbed numbers, load a separate ``lowbit serve`` process through --url.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lowbit.bench import load_faults
from lowbit.errors import LowbitError
from lowbit.report_files import write_json

MIXUP_CHARS = 8  # characters (about two tokens of English): a difference before this is a mix-up

DEFAULT_PROMPTS = [  # distinct, of varied length and kind, so that mixed-up answers differ at once
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Write a haiku about the sea.",
    "List three prime numbers greater than one hundred:",
    "Once upon a time, in a village at the foot of a mountain, there lived an old clockmaker who",
    "Translate to German: The weather is nice today.",
    "Q: Why is the sky blue?\nA:",
    "The three laws of thermodynamics state that",
    "SELECT name, COUNT(*) FROM orders GROUP BY",
    "A recipe for pancakes needs the following ingredients:",
    "In 1969, the Apollo 11 mission",
    "Explain the difference between a process and a thread in an operating system. A process",
    "Dear hiring manager, I am writing to apply for",
    "The quick brown fox",
    "Photosynthesis converts light energy into chemical energy. In the first stage,",
    "Here is a short summary of the plot of Hamlet:",
]


@dataclass
class LoadConfig:
    """What to send. ``url`` is the server's base (``http://host:port``, with or without ``/v1``)."""

    url: str
    model: str | None = None  # the model id to ask for; None: the first one the server lists
    clients: int = 8  # requests in flight at most
    requests: int = 32  # requests in all; request i sends prompts[i % len(prompts)]
    max_tokens: int = 64  # output tokens per request at most
    timeout_s: float = 300.0  # bound on the whole test (alone pass + load), seconds
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    chat: bool = False  # /v1/chat/completions (one user message) instead of /v1/completions
    mixup_chars: int = MIXUP_CHARS
    # faults (lowbit.bench.load_faults): this share of the streams hang up after `disconnect_after`
    # chunks; with `bad_requests`, one bad request of each kind goes out among the load; and the server
    # is checked afterwards (/health, a new request, KV slots free)
    disconnect_share: float = 0.0
    disconnect_after: int = 2
    bad_requests: bool = False
    max_body_bytes: int = 4 << 20  # the server's body limit, for the bad request over it
    # failures whose message holds this text are expected (a fault the caller injects): counted apart
    expected_error: str | None = None

    def __post_init__(self) -> None:
        if min(self.clients, self.requests, self.max_tokens) < 1:
            raise LowbitError("clients, requests and max_tokens must be >= 1")
        if not self.timeout_s > 0:
            raise LowbitError(f"the timeout must be > 0 seconds, got {self.timeout_s}")
        if not self.prompts:
            raise LowbitError("no prompts to send")
        if not 0 <= self.disconnect_share <= 1:
            raise LowbitError(f"the disconnect share must be in [0, 1], got {self.disconnect_share}")
        if self.disconnect_after < 1:
            raise LowbitError(f"disconnect_after must be >= 1 chunk, got {self.disconnect_after}")

    def hangs_up(self, i: int) -> bool:
        """Whether request i disconnects mid-stream: spread evenly, ``disconnect_share`` of them."""
        return int((i + 1) * self.disconnect_share) > int(i * self.disconnect_share)


@dataclass
class RequestResult:
    """One request. Times in seconds from just before it was sent; ``itl_s`` are the gaps between tokens."""

    index: int
    prompt: int  # index into the config's prompts
    text: str = ""
    error: str | None = None  # why it failed; None when it completed
    tokens: int = 0  # streamed chunks carrying a choice: one per generated token on lowbit serve
    ttft_s: float | None = None
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    hangs_up: bool = False  # disconnects on purpose after a few chunks (not a failure)
    equals_alone: bool | None = None  # None: not checked (it or its alone run failed or it hung up)
    first_diff: int | None = None  # index of the first character that differs from the alone text


@dataclass
class LoadReport:
    """What happened; times in seconds (``format_report`` prints milliseconds)."""

    url: str
    model: str
    endpoint: str
    clients: int
    max_tokens: int
    mixup_chars: int
    requested: int
    sent: int
    completed: int
    failed: int
    wall_s: float  # first request sent to last one ended
    output_tokens: int  # of the completed requests
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    alone: list[dict] = field(default_factory=list)  # per prompt: text, latency_s, error
    results: list[RequestResult] = field(default_factory=list)
    disconnected: int = 0  # hung up on purpose
    failed_expected: int = 0  # of `failed`: with the expected error (an injected fault)
    bad: list[dict] = field(default_factory=list)  # per bad request: name, expected, status, ok
    after: dict | None = None  # the server after the load (load_faults.server_after)

    @property
    def not_sent(self) -> int:
        return self.requested - self.sent

    @property
    def mixed_up(self) -> list[RequestResult]:
        return [r for r in self.results if r.first_diff is not None and r.first_diff < self.mixup_chars]

    @property
    def drifted(self) -> list[RequestResult]:
        return [r for r in self.results if r.first_diff is not None and r.first_diff >= self.mixup_chars]

    @property
    def alone_failed(self) -> int:
        return sum(a["error"] is not None for a in self.alone)

    @property
    def passed(self) -> bool:
        """Every request sent and completed (or hung up on purpose, or failed with the expected error),
        every alone run completed, none mixed up (drift allowed), every bad request got its status, and
        the server fine afterwards when that was checked."""
        return (self.not_sent == 0 and self.failed == self.failed_expected and self.alone_failed == 0
                and not self.mixed_up and all(b["ok"] for b in self.bad)
                and (self.after is None or load_faults.after_ok(self.after)))

    def to_json(self) -> dict:
        return asdict(self) | {"not_sent": self.not_sent, "mixed_up": len(self.mixed_up),
                               "drifted": len(self.drifted), "passed": self.passed}


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), interpolated linearly between ranks; None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def first_difference(a: str, b: str) -> int | None:
    """Index of the first character where ``a`` and ``b`` differ (the shorter length if one is a prefix
    of the other); None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _httpx() -> Any:
    try:
        import httpx
    except ImportError as exc:
        raise LowbitError("lowbit bench serve needs httpx: pip install 'lowbit[bench]' (or pip install httpx)") from exc
    return httpx


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _api_message(status: int, body: bytes) -> str:
    try:
        msg = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = body.decode(errors="replace")[:200]
    return f"HTTP {status}: {msg}"


def _path(cfg: LoadConfig) -> str:
    return "/v1/chat/completions" if cfg.chat else "/v1/completions"


class _ServerError(Exception):
    """A non-200 answer, an error chunk or a stream that ends without ``data: [DONE]``."""


def _body(cfg: LoadConfig, model: str, prompt: str, stream: bool) -> dict:
    body: dict[str, Any] = {"model": model, "max_tokens": cfg.max_tokens, "temperature": 0, "stream": stream}
    if cfg.chat:
        return body | {"messages": [{"role": "user", "content": prompt}]}
    return body | {"prompt": prompt}


async def _stream_one(client: Any, cfg: LoadConfig, model: str, res: RequestResult) -> None:
    """Send one streaming request and fill ``res`` from its server-sent events."""
    parts: list[str] = []
    t0 = time.perf_counter()
    last = t0
    done = False
    try:
        async with client.stream("POST", _path(cfg), json=_body(cfg, model, cfg.prompts[res.prompt], True)) as resp:
            if resp.status_code != 200:
                raise _ServerError(_api_message(resp.status_code, await resp.aread()))
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise _ServerError(f"error event: {chunk['error']}")
                if not chunk.get("choices"):
                    continue  # the usage chunk of stream_options.include_usage
                choice = chunk["choices"][0]
                if cfg.chat:
                    delta = choice.get("delta") or {}
                    if "role" in delta:  # the opening chunk of a chat stream carries no token
                        continue
                    piece = delta.get("content") or ""
                else:
                    piece = choice.get("text") or ""
                now = time.perf_counter()
                if res.tokens == 0:
                    res.ttft_s = now - t0
                else:
                    res.itl_s.append(now - last)
                last = now
                res.tokens += 1
                parts.append(piece)
                if res.hangs_up and res.tokens >= cfg.disconnect_after:
                    return  # leaving the `async with` closes the connection mid-stream
        if not done:
            raise _ServerError(f"the stream ended after {res.tokens} chunks without data: [DONE]")
        res.latency_s = time.perf_counter() - t0
    finally:
        res.text = "".join(parts)  # kept when the request fails too: what arrived before the failure


async def _alone_one(client: Any, cfg: LoadConfig, model: str, prompt: str) -> dict:
    t0 = time.perf_counter()
    resp = await client.post(_path(cfg), json=_body(cfg, model, prompt, False))
    if resp.status_code != 200:
        raise _ServerError(_api_message(resp.status_code, resp.content))
    choice = resp.json()["choices"][0]
    text = choice["message"]["content"] if cfg.chat else choice["text"]
    return {"text": text, "latency_s": time.perf_counter() - t0, "error": None}


async def _served_model(client: Any, url: str) -> str:
    httpx = _httpx()
    try:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise LowbitError(f"cannot list the models served at {url}/v1/models ({_describe(exc)}); is a server "
                          "running there? Start one with 'lowbit serve MODEL', or give the model name") from exc


async def run_load(cfg: LoadConfig) -> LoadReport:
    """Run the alone pass and then the load against ``cfg.url``; never raises for a failed request."""
    httpx = _httpx()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.timeout_s
    errors = (httpx.HTTPError, TimeoutError, ValueError, KeyError, IndexError, TypeError, _ServerError)
    bound = f"TimeoutError: the test's time bound of {cfg.timeout_s:g} s ran out"
    base = cfg.url.rstrip("/").removesuffix("/v1")
    limits = httpx.Limits(max_connections=cfg.clients, max_keepalive_connections=cfg.clients)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(cfg.timeout_s), limits=limits) as client:
        model = cfg.model or await _served_model(client, base)
        alone: list[dict] = []
        for prompt in cfg.prompts:  # one at a time: each prompt runs alone in the server
            try:
                async with asyncio.timeout_at(deadline):
                    alone.append(await _alone_one(client, cfg, model, prompt))
            except errors as exc:
                msg = bound if loop.time() >= deadline else _describe(exc)
                alone.append({"text": None, "latency_s": None, "error": msg})

        slots = asyncio.Semaphore(cfg.clients)

        async def one(i: int) -> RequestResult:
            res = RequestResult(index=i, prompt=i % len(cfg.prompts), hangs_up=cfg.hangs_up(i))
            try:
                async with asyncio.timeout_at(deadline):
                    await _stream_one(client, cfg, model, res)
            except errors as exc:
                res.error = bound if loop.time() >= deadline else _describe(exc)
            finally:
                slots.release()
            return res

        bad_cases = load_faults.bad_requests(model, cfg.max_body_bytes) if cfg.bad_requests else []
        every = max(1, cfg.requests // (len(bad_cases) + 1))  # bad requests spread over the load
        bad_tasks: list[asyncio.Task[dict]] = []
        tasks: list[asyncio.Task[RequestResult]] = []
        t0 = time.perf_counter()
        for i in range(cfg.requests):
            if bad_cases and i % every == every - 1:
                bad_tasks.append(asyncio.create_task(load_faults.send_bad(client, bad_cases.pop(0))))
            try:
                async with asyncio.timeout_at(deadline):
                    await slots.acquire()
            except TimeoutError:
                break  # out of time: the rest are not sent
            if loop.time() >= deadline:
                slots.release()
                break
            tasks.append(asyncio.create_task(one(i)))
        results = list(await asyncio.gather(*tasks))
        bad_tasks += [asyncio.create_task(load_faults.send_bad(client, b)) for b in bad_cases]  # time ran out
        bad = list(await asyncio.gather(*bad_tasks))
        wall = time.perf_counter() - t0
        after = None
        if cfg.bad_requests or cfg.disconnect_share or cfg.expected_error:
            async def ask_alone() -> str:
                return (await _alone_one(client, cfg, model, cfg.prompts[0]))["text"]

            after = await load_faults.server_after(client, ask_alone, alone[0]["text"])

    for r in results:  # compare each completed response with its prompt's alone run
        ref = alone[r.prompt]["text"]
        if r.error is None and ref is not None and not r.hangs_up:
            r.first_diff = first_difference(r.text, ref)
            r.equals_alone = r.first_diff is None
    ok = [r for r in results if r.error is None and not r.hangs_up]
    failed = [r for r in results if r.error is not None]
    expected = [r for r in failed if cfg.expected_error and cfg.expected_error in r.error]
    out_tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    itl = [g for r in ok for g in r.itl_s]
    return LoadReport(
        url=base, model=model, endpoint=_path(cfg), clients=cfg.clients, max_tokens=cfg.max_tokens,
        mixup_chars=cfg.mixup_chars, requested=cfg.requests, sent=len(results), completed=len(ok),
        failed=len(failed), wall_s=wall, output_tokens=out_tokens,
        tokens_per_s=out_tokens / wall if wall > 0 else 0.0, requests_per_s=len(ok) / wall if wall > 0 else 0.0,
        ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
        latency_p50_s=percentile(lat, 50), latency_p99_s=percentile(lat, 99),
        itl_p50_s=percentile(itl, 50), itl_p99_s=percentile(itl, 99), alone=alone, results=results,
        disconnected=sum(r.hangs_up and r.error is None for r in results), failed_expected=len(expected),
        bad=bad, after=after)


def format_report(report: LoadReport) -> str:
    """A short Markdown summary: latencies (ms), throughput, request counts, correctness, errors."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:.1f}"

    r = report
    lines = [
        (f"{r.requested} requests ({r.clients} clients, max {r.max_tokens} tokens, greedy) to {r.model} "
         f"at {r.url}{r.endpoint}"),
        "",
        "| ms | p50 | p99 |",
        "|---|---|---|",
        f"| time to first token | {ms(r.ttft_p50_s)} | {ms(r.ttft_p99_s)} |",
        f"| end-to-end latency | {ms(r.latency_p50_s)} | {ms(r.latency_p99_s)} |",
        f"| inter-token latency | {ms(r.itl_p50_s)} | {ms(r.itl_p99_s)} |",
        "",
        (f"throughput: {r.tokens_per_s:.1f} output tokens/s, {r.requests_per_s:.2f} requests/s "
         f"({r.output_tokens} tokens in {r.wall_s:.2f} s)"),
        (f"requests: {r.sent} sent, {r.completed} completed, {r.failed} failed, {r.not_sent} not sent "
         f"(time bound); alone runs: {len(r.alone) - r.alone_failed} of {len(r.alone)} completed"),
    ]
    checked = [x for x in r.results if x.equals_alone is not None]
    drift = f" (first differences at characters {sorted(x.first_diff for x in r.drifted)})" if r.drifted else ""
    lines.append(f"correctness: {sum(x.equals_alone for x in checked)} of {len(checked)} checked responses equal "
                 f"their alone run; {len(r.drifted)} drift{drift}, {len(r.mixed_up)} mixed up "
                 f"(differ before character {r.mixup_chars})")
    for x in r.mixed_up:
        lines.append(f"  mixed up: request {x.index} (prompt {x.prompt}) got {x.text[:60]!r}, alone "
                     f"{r.alone[x.prompt]['text'][:60]!r}")
    errs = Counter([x.error for x in r.results if x.error] + [a["error"] for a in r.alone if a["error"]])
    for msg, n in errs.most_common():
        lines.append(f"  error x{n}: {msg}")
    for b in r.bad:
        if not b["ok"]:
            lines.append(f"  bad request {b['name']!r}: expected {b['expected']}, got {b['status'] or b['error']}")
    if r.bad or r.after is not None or r.disconnected:
        lines.append(format_summary(r))
    lines.append("PASS" if r.passed else "FAIL")
    return "\n".join(lines)


def format_summary(r: LoadReport) -> str:
    """The fault and load test in one line: what was sent, what came back, the server afterwards."""
    checked = [x for x in r.results if x.equals_alone is not None]
    equal = sum(bool(x.equals_alone) for x in checked)
    hung = sum("time bound" in (x.error or "") for x in r.results) + r.not_sent
    a = r.after or {}
    slots = "slots unknown" if a.get("slots_used") is None else \
        f"{a['slots_used']:.0f} of {a['slots']:.0f} KV slots in use, {a['queued']:.0f} queued"
    after = "not checked" if r.after is None else \
        f"/health {a.get('health')}, a new request {'equal to' if a.get('answers') else 'NOT equal to'} its alone run, {slots}"
    unexpected = r.failed - r.failed_expected
    return (f"fault+load: {r.sent} streams from {r.clients} clients in {r.wall_s:.1f} s: {r.completed} completed "
            f"({equal} of {len(checked)} equal to their prompt alone), {r.disconnected} hung up mid-stream, "
            f"{r.failed_expected} failed by the injected fault, {unexpected} other failures, {hung} hung; "
            f"bad requests {sum(b['ok'] for b in r.bad)}/{len(r.bad)} got their 4xx; after: {after}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="a model directory, .gguf file or known name to serve in this process on a free loopback "
                   "port (or give --url)")
    p.add_argument("--url", default=None, help="base URL of a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model-name", default=None, help="model id to request (default: the first the server lists)")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default: 8)")
    p.add_argument("--requests", type=int, default=32, help="requests in all (default: 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request at most (default: 64)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds for the whole test, model load excluded; requests not sent or not finished by "
                   "then are reported (default: 300)")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="a text file, one prompt per line (default: 16 built-in prompts); request i sends prompt "
                   "i mod their number")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions (prompts as user messages)")
    p.add_argument("--disconnect-share", type=float, default=0.0,
                   help="share of the streams that hang up after two chunks, e.g. 0.25 (default: 0); their slots "
                   "must come back")
    p.add_argument("--bad-requests", action="store_true",
                   help="mix one bad request of each kind into the load (malformed JSON, empty prompt, max_tokens "
                   "past the context, n > 1, token id outside the vocabulary, ...): each must get its 4xx; then "
                   "check the server still answers and holds no request")
    p.add_argument("--json", metavar="FILE", default=None, help="write the report, every request included, as JSON")
    srv = p.add_argument_group("in-process server (with MODEL)")
    srv.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    srv.add_argument("--dtype", default="auto", help="fp32, fp16 or bf16 (default: bf16 on GPUs that have it)")
    srv.add_argument("--max-slots", type=int, default=None, help="KV slots (default: as many as fit)")
    srv.add_argument("--max-len", type=int, default=None, help="tokens per sequence (default: the model's context)")
    srv.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per engine step (default: 256)")


def main(args: argparse.Namespace) -> int:
    """Run ``lowbit bench serve``: 0 when the test passed, 1 when a request failed, was not sent or was
    mixed up. Bad options raise LowbitError."""
    if (args.model is None) == (args.url is None):
        raise LowbitError("give either MODEL (served in this process) or --url URL (a running server), not both")
    prompts = list(DEFAULT_PROMPTS)
    if args.prompts:
        try:
            prompts = [ln for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise LowbitError(f"cannot read prompts from {args.prompts}: {exc}") from exc
    cfg = LoadConfig(url=args.url or "", model=args.model_name, clients=args.clients, requests=args.requests,
                     max_tokens=args.max_tokens, timeout_s=args.timeout, prompts=prompts, chat=args.chat,
                     disconnect_share=args.disconnect_share, bad_requests=args.bad_requests)
    if args.model is None:
        report = asyncio.run(run_load(cfg))
    else:
        from lowbit.serve.app import load_app
        from lowbit.serve.runner import BackgroundServer

        app = load_app(args.model, device=args.device, dtype=args.dtype, name=args.model_name,
                       max_slots=args.max_slots, max_len=args.max_len, prefill_chunk=args.prefill_chunk,
                       max_queue=args.clients)  # every client's request fits: the test measures, never 429s
        served = app.state.served
        with BackgroundServer(app) as url:
            print(f"[serving {served.name} on {served.loaded.device} at {url}/v1, "
                  f"{served.loop.engine.num_slots} KV slots of {served.loop.engine.max_len} tokens]", file=sys.stderr)
            report = asyncio.run(run_load(replace(cfg, url=url, model=served.name)))
    print(format_report(report))
    if args.json:
        write_json(args.json, report.to_json())
    return 0 if report.passed else 1
