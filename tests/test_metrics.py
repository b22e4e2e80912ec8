"""ServerMetrics: what a Prometheus scraper actually parses out of ``render()``."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from engine.types import EngineStats
from server.metrics import ServerMetrics


def parse(metrics: ServerMetrics) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from the exposition text."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_every_documented_name_is_exposed_from_the_start() -> None:
    samples = parse(ServerMetrics())
    for name in [
        "gptoss_time_to_first_token_seconds_bucket",
        "gptoss_time_to_first_token_seconds_count",
        "gptoss_inter_token_latency_seconds_sum",
        "gptoss_e2e_request_latency_seconds_count",
        "gptoss_request_queue_time_seconds_count",
        "gptoss_prompt_tokens_total",
        "gptoss_generation_tokens_total",
        "gptoss_reasoning_tokens_total",
        "gptoss_num_requests_running",
        "gptoss_num_requests_waiting",
        "gptoss_kv_cache_usage_ratio",
        "gptoss_kv_cache_blocks_used",
        "gptoss_kv_cache_blocks_total",
        "gptoss_prefix_cache_hit_ratio",
        "gptoss_num_preemptions_total",
        "gptoss_prefix_cache_hit_tokens_total",
    ]:
        assert name in samples, name
    assert all(name.startswith("gptoss_") for name in samples)


def test_requests_counted_by_endpoint_and_status() -> None:
    m = ServerMetrics()
    m.observe_request("/v1/chat/completions", 200)
    m.observe_request("/v1/chat/completions", 200)
    m.observe_request("/v1/chat/completions", 429)
    m.observe_request("/v1/models", 200)
    got = parse(m)["gptoss_requests_total"]
    assert got[(("endpoint", "/v1/chat/completions"), ("status", "200"))] == 2
    assert got[(("endpoint", "/v1/chat/completions"), ("status", "429"))] == 1
    assert got[(("endpoint", "/v1/models"), ("status", "200"))] == 1


def test_histograms_put_observations_in_cumulative_buckets() -> None:
    m = ServerMetrics()
    for seconds in (0.003, 0.05, 0.05, 3.0):
        m.observe_ttft(seconds)
    m.observe_inter_token(0.02)
    m.observe_e2e(12.0)
    m.observe_queue_time(0.0)
    m.observe_ttft(-1e-9)  # clock jitter never makes a negative observation
    s = parse(m)
    buckets = {dict(k)["le"]: v for k, v in s["gptoss_time_to_first_token_seconds_bucket"].items()}
    assert buckets["0.005"] == 2  # 0.003 and the clamped -1e-9
    assert buckets["0.06"] == 4
    assert buckets["2.5"] == 4
    assert buckets["5.0"] == 5
    assert buckets["+Inf"] == 5
    values = sorted(float(le) for le in buckets)
    counts = [buckets[k] for k in sorted(buckets, key=float)]
    assert counts == sorted(counts) and math.isinf(values[-1])
    assert s["gptoss_time_to_first_token_seconds_count"][()] == 5
    assert s["gptoss_time_to_first_token_seconds_sum"][()] == pytest.approx(3.103, abs=1e-6)
    assert s["gptoss_inter_token_latency_seconds_count"][()] == 1
    assert s["gptoss_e2e_request_latency_seconds_sum"][()] == 12.0
    assert s["gptoss_request_queue_time_seconds_count"][()] == 1


def test_token_counters_accumulate_and_ignore_zero() -> None:
    m = ServerMetrics()
    m.add_tokens(prompt=100, generated=20, reasoning=7)
    m.add_tokens(prompt=5, generated=0, reasoning=0)
    s = parse(m)
    assert s["gptoss_prompt_tokens_total"][()] == 105
    assert s["gptoss_generation_tokens_total"][()] == 20
    assert s["gptoss_reasoning_tokens_total"][()] == 7


def test_engine_snapshot_sets_gauges() -> None:
    m = ServerMetrics()
    m.update_engine(
        EngineStats(
            num_running=3,
            num_waiting=5,
            kv_blocks_used=25,
            kv_blocks_total=100,
            prefix_cache_queried_tokens=400,
            prefix_cache_hit_tokens=100,
            num_preemptions=2,
            num_steps=77,
        )
    )
    s = parse(m)
    assert s["gptoss_num_requests_running"][()] == 3
    assert s["gptoss_num_requests_waiting"][()] == 5
    assert s["gptoss_kv_cache_blocks_used"][()] == 25
    assert s["gptoss_kv_cache_blocks_total"][()] == 100
    assert s["gptoss_kv_cache_usage_ratio"][()] == 0.25
    assert s["gptoss_prefix_cache_hit_ratio"][()] == 0.25
    assert s["gptoss_num_preemptions_total"][()] == 2
    assert s["gptoss_prefix_cache_queried_tokens_total"][()] == 400
    assert s["gptoss_prefix_cache_hit_tokens_total"][()] == 100
    assert s["gptoss_engine_steps_total"][()] == 77
    assert s["gptoss_engine_alive"][()] == 1
    # An empty engine (no blocks, no lookups yet) reads 0, never NaN.
    m.update_engine(EngineStats(alive=False))
    s = parse(m)
    assert s["gptoss_kv_cache_usage_ratio"][()] == 0
    assert s["gptoss_prefix_cache_hit_ratio"][()] == 0
    assert s["gptoss_num_requests_running"][()] == 0
    assert s["gptoss_engine_alive"][()] == 0


def test_registries_are_private_to_each_instance() -> None:
    a, b = ServerMetrics(), ServerMetrics()  # a global registry would raise "Duplicated timeseries"
    a.observe_request("/health", 200)
    assert parse(b).get("gptoss_requests_total", {}) == {}
    assert not any(name.startswith("gptoss_") for name in REGISTRY._names_to_collectors)
