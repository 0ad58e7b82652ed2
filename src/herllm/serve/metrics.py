"""Prometheus metrics of one server (its own registry, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("herllm_requests", "requests by route and status", ["route", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("herllm_request_seconds", "request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.ttft = Histogram("herllm_time_to_first_token_seconds", "time to the first token", ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tokens = Counter("herllm_tokens", "tokens by kind (prompt, completion)", ["kind"], registry=r)  # fmt: skip
        self.exchanges = Counter("herllm_exchanges_logged", "exchanges written to the interaction log", registry=r)  # fmt: skip
        self.feedback = Counter("herllm_feedback", "feedback by kind (up, down, correction)", ["kind"], registry=r)  # fmt: skip
        self.in_flight = Gauge("herllm_requests_in_flight", "requests being answered", registry=r)  # fmt: skip
        self.version = Gauge("herllm_adapter_version_info", "the adapter version serving (1)", ["version"], registry=r)  # fmt: skip
        self.swaps = Gauge("herllm_adapter_swaps", "adapter versions loaded since start", registry=r)  # fmt: skip
        self._version: str | None = None

    def serving(self, version: str, swaps: int) -> None:
        if version != self._version:
            if self._version is not None:
                self.version.remove(self._version)
            self.version.labels(version).set(1)
            self._version = version
        self.swaps.set(swaps)

    def render(self) -> bytes:
        return generate_latest(self.registry)
