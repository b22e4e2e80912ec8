"""docker-compose.yml against the compose-spec schema and the other deploy files, and the
environment contract with the server: every variable the image, compose and Kubernetes set is
one the server reads, and its parser accepts the values. (The image: test_deploy_image.py.)"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from deploy_files import (
    COMPOSE,
    ROOT,
    compose,
    deploy_env_sets,
    env_file_vars,
    image_env,
    server_service,
    stage,
    tool,
)

from server.cli import build_arg_parser, parse_settings
from server.setting_values import parse_bytes

# Variables the image sets for Python, pip and the cache folder: not server settings.
NON_SERVER_VARS = {
    "PATH",
    "HOME",
    "XDG_CACHE_HOME",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
}


def server_known_vars() -> set[str]:
    """GPTOSS_ + upper snake of each long option of the server's own argument parser."""
    known = set()
    for action in build_arg_parser()._actions:
        longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
        if longs and not isinstance(action, argparse._HelpAction):
            known.add("GPTOSS_" + longs[0][2:].replace("-", "_").upper())
    return known


def check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    cmd = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_compose_file_matches_the_compose_spec_and_a_broken_one_does_not(tmp_path: Path) -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = compose()
    broken["services"]["gptoss"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] = [1]
    broken["services"]["gptoss"]["heathcheck"] = broken["services"]["gptoss"].pop("healthcheck")
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(broken))
    result = check_compose_schema(bad)
    assert result.returncode != 0 and "heathcheck" in result.stdout


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def test_compose_server_service_runs_the_gpu_image_with_model_key_health_and_drain() -> None:
    svc = server_service()
    assert svc["build"] == {"context": ".", "args": {"VARIANT": "gpu"}}
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    (volume,) = svc["volumes"]
    assert volume.endswith(":/models:ro")
    assert svc["environment"]["GPTOSS_MODEL"].startswith("/models/")
    (port,) = svc["ports"]
    assert port.endswith(":8000") and image_env("gpu")["GPTOSS_PORT"] == "8000"
    (env_file,) = svc["env_file"]
    assert env_file == {"path": "deploy/gptoss.env", "required": True}
    example = env_file_vars(ROOT / "deploy" / "gptoss.env.example")
    assert set(example) == {"GPTOSS_API_KEY", "GPTOSS_REASONING_ENCRYPTION_KEY"}  # the secrets
    assert "gptoss.env" in (ROOT / "deploy" / ".gitignore").read_text().split()
    healthcheck = svc["healthcheck"]
    assert healthcheck["test"] == [
        "CMD",
        *json.loads(stage("final").all("HEALTHCHECK")[0].split("CMD", 1)[1]),
    ]
    assert seconds(healthcheck["start_period"]) >= 300
    assert svc["restart"] == "unless-stopped" and svc["init"] is True
    drain = float(svc["environment"]["GPTOSS_DRAIN_TIMEOUT"])
    assert drain + 5 <= seconds(svc["stop_grace_period"]) <= drain + 30


def test_compose_server_uses_the_redis_service_as_its_response_store() -> None:
    services = compose()["services"]
    redis = services["redis"]
    assert "profiles" not in redis and "ports" not in redis  # always on, never on the host
    assert redis["image"].startswith("redis:") and redis["command"][0] == "redis-server"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    server = server_service()
    assert server["depends_on"] == {"redis": {"condition": "service_healthy"}}
    url = urlsplit(server["environment"]["GPTOSS_RESPONSE_STORE"])
    assert (url.scheme, url.hostname, url.port or 6379) == ("redis", "redis", 6379)
    store_cap = parse_settings([], environ=deploy_env_sets()["compose"]).response_store_max_bytes
    args = redis["command"]
    assert parse_bytes(args[args.index("--maxmemory") + 1].replace("mb", "MiB")) > store_cap
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru"  # values only, never the index


def test_compose_monitoring_profile_mounts_files_that_exist() -> None:
    services = compose()["services"]
    assert "profiles" not in services["gptoss"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
            else:
                assert source in compose()["volumes"], volume
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/gptoss.yml").read_text())
    assert grafana_mounts["./deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == grafana_mounts["./deploy/grafana/dashboards"] + "/gptoss.json"
    assert (ROOT / "deploy/grafana/dashboards/gptoss.json").is_file()


# ---- the environment contract with the server ------------------------------------------------


def test_every_variable_the_deploy_files_set_is_one_the_server_reads() -> None:
    known = server_known_vars()
    for fixed in ("HOST", "PORT", "MODEL", "SERVED_MODEL_NAME", "DTYPE", "DEVICE", "KV_CACHE_MEMORY"):
        assert f"GPTOSS_{fixed}" in known  # the contract the deploy files rely on
    assert {"GPTOSS_API_KEY", "GPTOSS_DRAIN_TIMEOUT", "GPTOSS_MAX_NUM_SEQS", "GPTOSS_MAX_WAITING"} <= known
    for where, env in deploy_env_sets().items():
        for name in env:
            if name.startswith("GPTOSS_"):
                assert name in known, f"{where} sets {name}, which the server does not read"
            else:
                assert name in NON_SERVER_VARS, f"{where} sets {name}: not a server variable"
    for name in re.findall(r"\bGPTOSS_[A-Z0-9_]+", (ROOT / "deploy" / "README.md").read_text()):
        assert name in known, f"deploy/README.md documents {name}, which the server does not read"


def test_the_server_parses_each_deploy_environment() -> None:
    """The values, not just the names: the server's own parser accepts them."""
    envs = deploy_env_sets()
    settings = {where: parse_settings([], environ=env) for where, env in envs.items()}
    assert settings["image cpu"].host == "0.0.0.0" and settings["image cpu"].port == 8000
    assert settings["image gpu"].device == "cuda" and settings["image gpu"].dtype == "bfloat16"
    for where in ("compose", "kubernetes"):
        s = settings[where]
        assert s.model == "/models/gpt-oss-20b" and s.model_names() == ["gpt-oss-20b"]
        assert s.drain_timeout == 120.0 and s.max_num_seqs == 64 and s.max_waiting == 256
        assert s.device == "cuda" and s.api_keys
        assert s.kv_cache_memory == 6 * 2**30
    assert settings["kubernetes"].api_keys == ["secret-key-1", "secret-key-2"]
    # A flag after the image name still wins over the image's environment.
    assert parse_settings(["--port", "9000"], environ=envs["image gpu"]).port == 9000


@pytest.mark.parametrize("bad", [{"GPTOSS_DRAIN_TIMEOUT": "soon"}, {"GPTOSS_DTYPE": "int3"}])
def test_a_bad_deploy_value_fails_at_startup(bad: dict[str, str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings([], environ={**deploy_env_sets()["compose"], **bad})
