"""Prometheus metrics for /metrics (a registry per server, so two servers in one process do not
collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edgesdk_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("edgesdk_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.prefilled_tokens = Counter("edgesdk_prefilled_tokens", "prompt tokens computed (not reused from a "
                                        "slot's cache)", registry=r)
        self.completion_tokens = Counter("edgesdk_completion_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("edgesdk_time_to_first_token_seconds", "from submission to the first token "
                              "(queueing + prefill)", buckets=LATENCY, registry=r)
        self.token_latency = Histogram("edgesdk_time_per_output_token_seconds", "between consecutive tokens of "
                                       "one generation", buckets=LATENCY, registry=r)
        self.queue_depth = Gauge("edgesdk_queue_depth", "requests waiting for a slot", registry=r)
        self.busy_slots = Gauge("edgesdk_busy_slots", "slots generating", registry=r)
        self.slots = Gauge("edgesdk_slots", "slots (--parallel)", registry=r)

    def finished(self, result) -> None:
        self.prompt_tokens.inc(result.prompt_tokens)
        self.prefilled_tokens.inc(result.prefilled_tokens)
        self.completion_tokens.inc(result.generated_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
