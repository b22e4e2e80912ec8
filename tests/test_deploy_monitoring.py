"""Prometheus and Grafana files: parsed, and every metric they query is one the server exposes.

Each PromQL expression (dashboard panels, template variables, adapter rules) is parsed with
a real PromQL parser (promql-parser) after Grafana's and the adapter's template variables
are filled in, and every metric name it selects must appear in ServerMetrics' exposition.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine.types import EngineStats
from server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "gptoss.json"
# Grafana's built-in and dashboard variables, replaced by values PromQL accepts.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "1h",
    "${instance}": ".*",
    "$instance": ".*",
}


def exposed_series_names() -> set[str]:
    """Every sample name a scrape of a busy server shows (labelled series need one observation)."""
    m = ServerMetrics()
    m.observe_request("/v1/chat/completions", 200)
    m.observe_request("/v1/chat/completions", 503)
    m.update_engine(EngineStats(num_running=1, kv_blocks_total=10))
    body = m.render()[0].decode()
    return {s.name for family in text_string_to_metric_families(body) for s in family.samples}


def selected_metrics(expr: str) -> list[str]:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown template variable in {expr}"
    names: list[str] = []

    def visit(node) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)  # raises on a syntax error
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def test_promql_check_is_live() -> None:
    assert selected_metrics("sum(rate(gptoss_requests_total[$__rate_interval]))") == ["gptoss_requests_total"]
    with pytest.raises(ValueError):
        selected_metrics("sum(rate(gptoss_requests_total[$__rate_interval])")


def test_dashboard_is_well_formed_grafana_json() -> None:
    d = dashboard()
    assert d["uid"] == "gptoss-server" and d["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for panel in d["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))


def test_every_metric_the_dashboard_queries_is_exposed_by_the_server() -> None:
    exposed = exposed_series_names()
    variable_queries = [
        re.fullmatch(r"label_values\((\w+), *\w+\)", v["definition"]).group(1)
        for v in dashboard()["templating"]["list"]
        if v["type"] == "query"
    ]
    used = set(variable_queries)
    for expr in dashboard_exprs():
        names = selected_metrics(expr)
        assert names, f"no metric in {expr}"
        used |= set(names)
    missing = used - exposed
    assert not missing, f"the dashboard queries metrics the server does not expose: {missing}"


def test_dashboard_shows_what_operators_need() -> None:
    exprs = dashboard_exprs()
    joined = "\n".join(exprs)
    assert "rate(gptoss_requests_total" in joined  # request rate
    assert 'status=~"5.."' in joined  # error rate
    for histogram in ("gptoss_time_to_first_token_seconds", "gptoss_inter_token_latency_seconds"):
        quantiles = {
            float(m) for m in re.findall(rf"histogram_quantile\(([\d.]+), [^\n]*{histogram}_bucket", joined)
        }
        assert {0.5, 0.9, 0.99} <= quantiles, histogram
    assert "rate(gptoss_generation_tokens_total" in joined  # tokens/s
    for gauge in (
        "gptoss_num_requests_running",
        "gptoss_num_requests_waiting",
        "gptoss_kv_cache_usage_ratio",
    ):
        assert gauge in joined


def test_prometheus_scrapes_the_compose_server_and_grafana_reads_that_prometheus() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"] and compose["services"][host]["ports"][0].endswith(f":{port}")
    (datasource,) = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


def test_adapter_rules_are_valid_promql_over_exposed_metrics() -> None:
    values = yaml.safe_load((ROOT / "deploy" / "k8s" / "prometheus-adapter-values.yaml").read_text())
    exposed = exposed_series_names()
    for rule in values["rules"]["custom"]:
        series_names = [n for n in exposed if re.fullmatch(rule["name"]["matches"], n)]
        assert series_names, rule["name"]
        for name in series_names:
            assert re.search(rule["seriesQuery"].split('"')[1], name)
            query = (
                rule["metricsQuery"]
                .replace("<<.Series>>", name)
                .replace("<<.LabelMatchers>>", 'namespace="gptoss",pod=~"gptoss-server-.*"')
                .replace("<<.GroupBy>>", "pod")
            )
            assert selected_metrics(query) == [name]
