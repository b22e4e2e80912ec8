"""The image's runtime contract against the real server (no Docker here, so the same command and env).

Starts ``python -m server`` exactly as the CPU image's ENTRYPOINT would, with the image's
environment and an API key (the embedded random model, generated into a temp HOME), and
checks what the orchestrators rely on: the HEALTHCHECK script passes, the probe and scrape
endpoints need no key while the API does, /ready turns 200 once loaded, /metrics serves
every series the dashboard and the autoscaler query, and SIGTERM ends the process with 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_files import image_env  # noqa: E402  (the Dockerfile reader)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queried_metric_names() -> set[str]:
    names: set[str] = set()

    def visit(node) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        return True

    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/gptoss.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            promql_parser.walk(promql_parser.parse(expr), visit)
    hpa = yaml.safe_load((ROOT / "deploy/k8s/hpa.yaml").read_text())
    names |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    return names


def test_server_started_like_the_image_serves_probes_metrics_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in image_env("cpu").items() if k != "PATH"}
    env.update(
        PATH=os.environ["PATH"],
        HOME=str(tmp_path),
        XDG_CACHE_HOME=str(tmp_path / ".cache"),
        PYTHONPATH=str(ROOT),
        GPTOSS_HOST="127.0.0.1",  # loopback only in tests; the image listens on 0.0.0.0
        GPTOSS_PORT=str(port),
        GPTOSS_API_KEY="k8s-secret-1,k8s-secret-2",
        GPTOSS_DRAIN_TIMEOUT="5",
    )
    entrypoint = ["python", "-m", "server"]  # the image's ENTRYPOINT; `python` is this interpreter here
    proc = subprocess.Popen(
        [sys.executable, *entrypoint[1:]],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=5) as client:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stderr.read()
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server never became ready"
                time.sleep(0.3)

            healthcheck = subprocess.run(
                [sys.executable, str(ROOT / "deploy/docker/healthcheck.py")],
                env={"GPTOSS_PORT": str(port)},
                timeout=30,
            )
            assert healthcheck.returncode == 0

            # Probes and scrape are open; the API wants one of the Secret's keys.
            assert client.get("/health").status_code == 200
            assert client.get("/v1/models").status_code == 401
            models = client.get("/v1/models", headers={"Authorization": "Bearer k8s-secret-2"})
            assert models.status_code == 200

            scrape = client.get("/metrics")
            assert scrape.status_code == 200
            assert scrape.headers["content-type"].startswith("text/plain")
            families = list(text_string_to_metric_families(scrape.text))
            exposed = {s.name for f in families for s in f.samples}
            missing = queried_metric_names() - exposed
            assert not missing, f"the dashboard/HPA query series the live server lacks: {missing}"
            by_name = {s.name: s for f in families for s in f.samples if not s.labels}
            assert by_name["gptoss_num_requests_running"].value == 0
            assert by_name["gptoss_kv_cache_blocks_total"].value > 0
            statuses = {
                (s.labels["endpoint"], s.labels["status"])
                for f in families
                for s in f.samples
                if s.name == "gptoss_requests_total"
            }
            assert ("/v1/models", "200") in statuses
            assert any(status == "401" for _, status in statuses)  # the refused request counts too

        proc.send_signal(signal.SIGTERM)  # what `docker stop` and the kubelet send
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
