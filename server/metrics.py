"""Prometheus metrics of the server, in a registry of its own.

Each ``ServerMetrics`` owns a ``CollectorRegistry`` (never the process-global one), so two
servers in one test process never collide and ``render()`` shows exactly this server.

Names start with ``gptoss_``; the Grafana dashboard in ``deploy/grafana/`` and the
Kubernetes autoscaler (``deploy/k8s/``) query them by name, and a test checks that every
name they use exists here.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from engine.types import EngineStats, RequestMetrics

# Buckets in seconds. Time to first token spans a cached short prompt on a GPU (~10 ms) to a
# long prefill behind a queue on CPU (minutes); inter-token latency is 5-100 ms on a GPU and
# up to seconds on CPU or under heavy batching; whole requests run from ~0.1 s to many minutes.
TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
QUEUE_TIME_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip

# The classic text format every Prometheus (2.x and 3.x) parses; our names are all legacy-valid,
# so the body is the same whichever version the client library calls "latest".
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """All metrics of one server. Thread-safe (prometheus_client locks each child)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Counter names are given without `_total`: the client appends it in the exposition.
        self.requests = Counter(
            "gptoss_requests",
            "HTTP requests finished, by endpoint (route template) and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "gptoss_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "gptoss_inter_token_latency_seconds",
            "Time between two consecutive generated tokens of one request.",
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "gptoss_e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_queue_time = Histogram(
            "gptoss_request_queue_time_seconds",
            "Time a request waited in the engine's queue before its first scheduling.",
            buckets=QUEUE_TIME_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gptoss_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter(
            "gptoss_generation_tokens", "Tokens generated (all channels, reasoning included).", registry=r
        )
        self.reasoning_tokens = Counter(
            "gptoss_reasoning_tokens", "Generated tokens in the analysis (reasoning) channel.", registry=r
        )
        self.num_requests_running = Gauge(
            "gptoss_num_requests_running", "Requests the engine is running now.", registry=r
        )
        self.num_requests_waiting = Gauge(
            "gptoss_num_requests_waiting", "Requests waiting in the engine's queue.", registry=r
        )
        self.kv_cache_usage_ratio = Gauge(
            "gptoss_kv_cache_usage_ratio",
            "Fraction of KV cache blocks held by live requests (0..1).",
            registry=r,
        )
        self.kv_cache_blocks_used = Gauge(
            "gptoss_kv_cache_blocks_used", "KV cache blocks held by live requests (both pools).", registry=r
        )
        self.kv_cache_blocks_total = Gauge(
            "gptoss_kv_cache_blocks_total", "KV cache blocks allocated at startup (both pools).", registry=r
        )
        self.prefix_cache_hit_ratio = Gauge(
            "gptoss_prefix_cache_hit_ratio",
            "Prompt tokens served from the prefix cache / prompt tokens looked up, since start.",
            registry=r,
        )
        # The engine reports cumulative counts: exposed as real counters (`_total`, TYPE counter)
        # read from the latest snapshot, so rate()/increase() are well-typed in Prometheus.
        self._engine_counters = _EngineCounters()
        r.register(self._engine_counters)
        self.engine_alive = Gauge(
            "gptoss_engine_alive", "1 while the engine loop is alive, 0 once it died.", registry=r
        )
        self.response_store_entries = Gauge(
            "gptoss_response_store_entries", "Responses kept in the response store.", registry=r
        )
        self.response_store_bytes = Gauge(
            "gptoss_response_store_bytes",
            "Bytes of the responses kept in the response store (bounded by --response-store-max-bytes).",
            registry=r,
        )

    def observe_request(self, endpoint: str, status: int) -> None:
        """Count one finished HTTP request; ``endpoint`` should be the route template, not the raw path."""
        self.requests.labels(endpoint=endpoint, status=str(int(status))).inc()

    def observe_ttft(self, seconds: float) -> None:
        self.time_to_first_token.observe(max(0.0, seconds))

    def observe_inter_token(self, seconds: float) -> None:
        self.inter_token_latency.observe(max(0.0, seconds))

    def observe_e2e(self, seconds: float) -> None:
        self.e2e_request_latency.observe(max(0.0, seconds))

    def observe_queue_time(self, seconds: float) -> None:
        self.request_queue_time.observe(max(0.0, seconds))

    def observe_finished(self, m: RequestMetrics) -> None:
        """The latencies of one finished engine request."""
        if m.queue_time is not None:
            self.observe_queue_time(m.queue_time)
        if m.time_to_first_token is not None:
            self.observe_ttft(m.time_to_first_token)
        if m.finished_time is not None:
            self.observe_e2e(m.finished_time - m.arrival_time)
        for earlier, later in zip(m.token_times, m.token_times[1:], strict=False):
            self.observe_inter_token(later - earlier)

    def add_tokens(self, prompt: int, generated: int, reasoning: int) -> None:
        """Add one request's token counts (call once per request, or per increment)."""
        if prompt > 0:
            self.prompt_tokens.inc(prompt)
        if generated > 0:
            self.generation_tokens.inc(generated)
        if reasoning > 0:
            self.reasoning_tokens.inc(reasoning)

    def update_engine(self, stats: EngineStats) -> None:
        """Copy an engine snapshot into the gauges (call before each render)."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_blocks_used.set(stats.kv_blocks_used)
        self.kv_cache_blocks_total.set(stats.kv_blocks_total)
        self.kv_cache_usage_ratio.set(stats.kv_usage)
        queried = stats.prefix_cache_queried_tokens
        self.prefix_cache_hit_ratio.set(stats.prefix_cache_hit_tokens / queried if queried else 0.0)
        self._engine_counters.snapshot = stats
        self.engine_alive.set(1 if stats.alive else 0)

    def update_store(self, entries: int, nbytes: int) -> None:
        self.response_store_entries.set(entries)
        self.response_store_bytes.set(nbytes)

    def render(self) -> tuple[bytes, str]:
        """The exposition text of this registry and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), PROMETHEUS_CONTENT_TYPE


class _EngineCounters(Collector):
    """The engine's cumulative counts as Prometheus counters, from the latest snapshot."""

    def __init__(self) -> None:
        self.snapshot = EngineStats()  # replaced whole by update_engine (atomic reference swap)

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        for name, doc, value in (
            ("gptoss_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queried_tokens),
            ("gptoss_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
             s.prefix_cache_hit_tokens),
            ("gptoss_num_preemptions", "Requests preempted to free KV blocks.", s.num_preemptions),
            ("gptoss_engine_steps", "Forward passes the engine has run.", s.num_steps),
        ):  # fmt: skip
            yield CounterMetricFamily(name, doc, value=value)
