"""Readers of the deploy files the deploy tests share: the Dockerfile (stages, instructions,
the environment an image starts the server with), docker-compose.yml, the Kubernetes
Deployment, env files, and every environment the deploy files give the server."""

from __future__ import annotations

import shlex
import shutil
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"


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
