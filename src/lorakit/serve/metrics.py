"""Prometheus metrics of `lorakit serve` (GET /metrics), in prometheus_client's own registry."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lorakit.infer.engine import Completion, Engine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "HTTP generation requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "prompt tokens of finished requests", registry=self.registry)
        self.generated_tokens = Counter("lorakit_generation_tokens", "tokens generated", registry=self.registry)
        self.latency = Histogram("lorakit_request_latency_seconds", "submit to last token", buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "submit to first token", buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        Gauge("lorakit_requests_running", "requests in the running batch", registry=self.registry).set_function(lambda: engine.load[0])
        Gauge("lorakit_requests_waiting", "requests queued for a slot", registry=self.registry).set_function(lambda: engine.load[1])
        Gauge("lorakit_adapters_loaded", "adapters held in memory", registry=self.registry).set_function(
            lambda: len(engine.registry.names()))

    def request_done(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def completed(self, endpoint: str, completion: Completion) -> None:
        self.request_done(endpoint, 200)
        self.prompt_tokens.inc(completion.prompt_tokens)
        self.generated_tokens.inc(completion.completion_tokens)
        self.latency.observe(completion.finished - completion.submitted)
        if completion.first_token is not None:
            self.ttft.observe(completion.first_token - completion.submitted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
