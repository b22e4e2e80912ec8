"""The container image and docker-compose: linted and cross-checked, since no Docker engine runs here.

hadolint lints the Dockerfile, the compose-spec JSON schema validates docker-compose.yml,
and the rest checks the seams between the files: the entrypoint is the README's command,
every variable the image/compose/Kubernetes set is one the server reads (and parses),
every COPY source survives .dockerignore, the healthcheck script answers like Docker expects.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlsplit

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from server.cli import build_arg_parser, parse_settings
from server.setting_values import parse_bytes

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
README_COMMAND = "python -m server"
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


def tool(name: str) -> str:
    """The dev extra's copy (next to this Python) first, then PATH."""
    beside = Path(sysconfig.get_path("scripts")) / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[dev]'"
    return found


# ---- a small Dockerfile reader ---------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def dockerfile_instructions(text: str) -> Iterator[Instruction]:
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments and blank lines may sit inside a continued instruction
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, args = logical.partition(" ")
        yield Instruction(keyword.upper(), args.strip())
        logical = ""


def dockerfile_stages(text: str = "") -> list[Stage]:
    stages: list[Stage] = []
    for ins in dockerfile_instructions(text or DOCKERFILE.read_text()):
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(ins)
    return stages


def env_pairs(args: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(args))


def global_args() -> dict[str, str]:
    out = {}
    for ins in dockerfile_instructions(DOCKERFILE.read_text()):
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG" and "=" in ins.args:
            key, value = ins.args.split("=", 1)
            out[key] = value
    return out


def stage(name: str) -> Stage:
    return next(s for s in dockerfile_stages() if s.name == name)


def image_env(variant: str) -> dict[str, str]:
    """What `docker run` starts the server with, for VARIANT=gpu or cpu (runtime base + final)."""
    env: dict[str, str] = {}
    for s in (stage(f"runtime-{variant}"), stage("final")):
        for args in s.all("ENV"):
            env.update(env_pairs(args))
    return env


# ---- the files under test ----------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def server_service() -> dict:
    return compose()["services"]["gptoss"]


def env_file_vars(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def k8s_server_container() -> dict:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    return deployment["spec"]["template"]["spec"]["containers"][0]


def server_known_vars() -> set[str]:
    """GPTOSS_ + upper snake of each long option of the server's own argument parser."""
    known = set()
    for action in build_arg_parser()._actions:
        longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
        if longs and not isinstance(action, argparse._HelpAction):
            known.add("GPTOSS_" + longs[0][2:].replace("-", "_").upper())
    return known


# ---- Dockerfile ------------------------------------------------------------------------------


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


def test_hadolint_passes_and_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\nADD . /src\nCMD python3 -m server\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3014", "DL3020", "DL3025"):
        assert rule in result.stdout, result.stdout


def test_dockerfile_has_gpu_and_cpu_variants_and_a_non_root_runtime() -> None:
    args = global_args()
    assert args["VARIANT"] == "gpu"  # `docker build .` gives the GPU image
    names = [s.name for s in dockerfile_stages()]
    assert names == ["builder", "runtime-cpu", "runtime-gpu", "final"]
    assert stage("runtime-gpu").base == "${CUDA_IMAGE}"
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    assert stage("final").base == "runtime-${VARIANT}"
    # Both runtime bases must carry the builder's Python (the venv is copied, not rebuilt).
    assert stage("builder").base == stage("runtime-cpu").base == "${UBUNTU_IMAGE}"
    assert args["CUDA_IMAGE"].endswith(args["UBUNTU_IMAGE"].replace(":", ""))
    # The CPU image installs torch from the CPU index, pinned by the same requirements file.
    builder_run = " ".join(stage("builder").all("RUN"))
    assert "grep '^torch==' /tmp/requirements.txt" in builder_run and "TORCH_CPU_INDEX" in builder_run

    final = stage("final")
    assert final.all("USER") == ["10001:10001"]
    assert final.all("EXPOSE") == [image_env("gpu")["GPTOSS_PORT"]] == ["8000"]
    assert image_env("gpu")["GPTOSS_DEVICE"] == "cuda" and "GPTOSS_DEVICE" not in image_env("cpu")
    (healthcheck,) = final.all("HEALTHCHECK")
    assert healthcheck.split("CMD", 1)[1].strip() == '["python3", "/usr/local/bin/gptoss-healthcheck"]'
    assert "--start-period=" in healthcheck
    # Nothing model-shaped is ever copied in; the model comes from a mounted volume.
    for s in dockerfile_stages():
        for copy in s.all("COPY") + s.all("ADD"):
            assert "models" not in copy and ".safetensors" not in copy, copy


def test_entrypoint_is_the_readme_command_with_nothing_baked_in() -> None:
    final = stage("final")
    (entrypoint,) = final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == README_COMMAND.split()
    assert final.all("CMD") == []  # no arguments the environment could not override
    # The README's first command starts the server in this form, and deploy/README.md documents it.
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
    assert README_COMMAND in first_block
    assert f"ENTRYPOINT is `{README_COMMAND}`" in (ROOT / "deploy" / "README.md").read_text()
    # `python` in the image is the venv's, where the project is installed.
    assert image_env("gpu")["PATH"].startswith("/opt/venv/bin:")
    # Neither compose nor Kubernetes replace the command.
    assert not {"entrypoint", "command"} & server_service().keys()
    assert not {"command", "args"} & k8s_server_container().keys()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gptoss-server"] == "server.__main__:main"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = re.escape(pattern.strip("/"))
        regex = regex.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_copy_needs_and_drops_secrets_and_models() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for s in dockerfile_stages():
        for copy in s.all("COPY"):
            words = [w for w in copy.split() if not w.startswith("--")]
            if "--from=" not in copy:
                sources += words[:-1]
    # Every package setuptools installs is copied into the build (a subpackage with its parent).
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        files = [source] if (ROOT / source).is_file() else ["/".join((source, "x.py"))]
        for f in files:
            assert not dockerignore_excludes(f, patterns), f
    assert not dockerignore_excludes("harmony/data/o200k_base.tiktoken", patterns)
    for secret_or_junk in (
        "deploy/gptoss.env",
        ".env",
        "models/gpt-oss-20b/model-00001-of-00003.safetensors",
        "server/model.safetensors",
        ".git/config",
        "tests/test_deploy.py",
        "server/__pycache__/app.cpython-312.pyc",
        "deploy/k8s/deployment.yaml",
    ):
        assert dockerignore_excludes(secret_or_junk, patterns), secret_or_junk


def test_requirements_pin_every_runtime_dependency_within_pyproject_ranges() -> None:
    pins = {}
    for line in (ROOT / "deploy" / "docker" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is a runtime dependency but the image does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), (dep, pins[name])


class _HealthHandler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def run_healthcheck(port: int) -> int:
    env = {"GPTOSS_PORT": str(port), "PATH": "/usr/bin:/bin"}
    script = ROOT / "deploy" / "docker" / "healthcheck.py"
    return subprocess.run([sys.executable, str(script)], env=env, timeout=30).returncode


def test_healthcheck_script_follows_health_endpoint() -> None:
    handler = type("Handler", (_HealthHandler,), {})
    server = HTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert run_healthcheck(port) == 0
        handler.status = 503
        assert run_healthcheck(port) == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert run_healthcheck(port) == 1  # nothing listening


# ---- docker-compose --------------------------------------------------------------------------


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


def deploy_env_sets() -> dict[str, dict[str, str]]:
    """Every environment the deploy files give the server, by where it comes from."""
    compose_env = {k: str(v) for k, v in server_service()["environment"].items()}
    compose_env.update(env_file_vars(ROOT / "deploy" / "gptoss.env.example"))
    k8s_env = {}
    for var in k8s_server_container()["env"]:
        k8s_env[var["name"]] = var.get("value", "secret-key-1,secret-key-2")
    return {
        "image gpu": image_env("gpu"),
        "image cpu": image_env("cpu"),
        "compose": {**image_env("gpu"), **compose_env},
        "kubernetes": {**image_env("gpu"), **k8s_env},
    }


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
