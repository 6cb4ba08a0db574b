"""Prometheus metrics of one server, in a registry of its own (two apps in one process, as in
the tests, never share or clash).

Series (counters get Prometheus' ``_total`` suffix):

* ``sequoia_requests_total{endpoint, status}``: HTTP requests answered;
* ``sequoia_prompt_tokens_total``, ``sequoia_generated_tokens_total``: tokens in and out;
* ``sequoia_engine_steps_total`` and the histogram ``sequoia_tokens_per_step``: one target
  forward per step, which yields the accepted draft tokens + 1 (the bonus token), so
  generated tokens / steps is speculation's gain;
* ``sequoia_time_per_token_seconds``: per request, decode time / generated tokens;
* ``sequoia_time_to_first_token_seconds``: per request, from queueing to the first token;
* ``sequoia_queue_length`` (jobs waiting), ``sequoia_jobs_running``, ``sequoia_jobs_cancelled_total``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TOKENS_PER_STEP_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """The server's series; the worker and the HTTP layer update them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "sequoia_requests", "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"], registry=registry,
        )
        self.prompt_tokens = Counter("sequoia_prompt_tokens", "Prompt tokens of decoded requests", registry=registry)
        self.generated_tokens = Counter("sequoia_generated_tokens", "Tokens generated", registry=registry)
        self.steps = Counter("sequoia_engine_steps", "Engine steps (one target forward each)", registry=registry)
        self.tokens_per_step = Histogram(
            "sequoia_tokens_per_step", "Tokens per engine step: accepted draft tokens + 1",
            buckets=TOKENS_PER_STEP_BUCKETS, registry=registry,
        )
        self.time_per_token = Histogram(
            "sequoia_time_per_token_seconds", "Decode time per generated token, one sample per request",
            buckets=SECONDS_BUCKETS, registry=registry,
        )
        self.time_to_first_token = Histogram(
            "sequoia_time_to_first_token_seconds", "From queueing a request to its first token",
            buckets=SECONDS_BUCKETS, registry=registry,
        )
        self.queue_length = Gauge("sequoia_queue_length", "Jobs waiting for the engine", registry=registry)
        self.running = Gauge("sequoia_jobs_running", "Jobs the engine is decoding (0 or 1)", registry=registry)
        self.cancelled = Counter(
            "sequoia_jobs_cancelled", "Jobs stopped early: client gone or server shutting down", registry=registry
        )

    def track_queue(self, length: Callable[[], int]) -> None:
        """Read the queue length from ``length`` at each scrape."""
        self.queue_length.set_function(length)

    def observe_step(self, accepted: int, emitted: int) -> None:
        """One engine step: ``accepted`` draft tokens (+1 bonus), ``emitted`` after any cut."""
        self.steps.inc()
        self.tokens_per_step.observe(accepted + 1)
        self.generated_tokens.inc(emitted)

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)
