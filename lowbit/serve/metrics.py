"""``/metrics``: what the server is doing, in the Prometheus text format (``prometheus-client``).

Each app has its own registry (several servers in one process, as in the tests, do not share
counters). Names follow Prometheus' conventions (``_total`` for counters, base units in seconds):

  lowbit_requests_total{route, status}       HTTP requests answered, by route and status code
  lowbit_prompt_tokens_total                 prompt tokens admitted into the engine
  lowbit_generation_tokens_total             tokens generated (stop tokens included)
  lowbit_time_to_first_token_seconds         request admitted -> its first token (histogram)
  lowbit_inter_token_latency_seconds         gaps between a request's tokens (histogram)
  lowbit_request_duration_seconds            request admitted -> its last event (histogram)
  lowbit_requests_waiting / _running         engine queue depth, and requests prefilling or decoding
  lowbit_kv_slots_used / lowbit_kv_slots     KV cache slots in use / in all
  lowbit_engine_restarts_total               engine rebuilds after a failed step
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lowbit.engine.scheduler import EngineStats

# Decode steps take ~2-20 ms on a GPU and tens of ms on a CPU; a first token waits for a prefill and
# possibly for a free KV slot: seconds.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's metrics; ``stats`` is read at every scrape (the engine's queue and slots then)."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lowbit_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lowbit_prompt_tokens", "Prompt tokens admitted into the engine", registry=r)
        self.generation_tokens = Counter("lowbit_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("lowbit_time_to_first_token_seconds", "Request admitted to its first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("lowbit_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.duration = Histogram("lowbit_request_duration_seconds", "Request admitted to its last event",
                                  buckets=_DURATION_BUCKETS, registry=r)
        self.restarts = Counter("lowbit_engine_restarts", "Engine rebuilds after a failed step", registry=r)
        self._stats = stats
        for name, doc, field in (
            ("lowbit_requests_waiting", "Requests queued for a KV slot", "waiting"),
            ("lowbit_requests_running", "Requests prefilling or decoding", None),
            ("lowbit_kv_slots_used", "KV cache slots in use", "slots_used"),
            ("lowbit_kv_slots", "KV cache slots in all", "slots_total"),
        ):
            Gauge(name, doc, registry=r).set_function(self._reader(field))

    def _reader(self, field: str | None) -> Callable[[], float]:
        def read() -> float:
            s = self._stats()
            return float(s.prefilling + s.running if field is None else getattr(s, field))
        return read

    def render(self) -> bytes:
        return generate_latest(self.registry)
