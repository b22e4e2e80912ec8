"""The container image, linted and cross-checked, since no Docker engine runs here: hadolint
lints the Dockerfile; the entrypoint is the README's command; every COPY source survives
.dockerignore; the image pins the runtime dependencies; the healthcheck script answers as
Docker expects. (docker-compose and the environment contract: test_deploy_compose.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

from deploy_files import (
    DOCKERFILE,
    ROOT,
    dockerfile_stages,
    global_args,
    image_env,
    k8s_server_container,
    server_service,
    stage,
    tool,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

README_COMMAND = "python -m server"


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
        "tests/test_deploy_image.py",
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
