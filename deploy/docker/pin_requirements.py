"""Write the image's pinned runtime requirements from what is installed here.

    python deploy/docker/pin_requirements.py > deploy/docker/requirements.txt

Walks ``[project].dependencies`` of pyproject.toml through the installed distributions'
metadata (markers evaluated for Linux, CPython 3.12: the image's Python) and pins each to
the installed version, so the image runs what the tests ran. torch's own CUDA libraries
(``nvidia-*``, ``cuda-*``, ``triton``) are left to torch's exact pins: they depend on which torch build
the image installs (CUDA from PyPI, or CPU from the CPU index), not on this machine.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
IMAGE_ENV = {
    **default_environment(),
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
LEFT_TO_TORCH = ("nvidia-", "cuda-", "triton")


def runtime_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    pins: dict[str, str] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
            continue
        if name in pins or name.startswith(LEFT_TO_TORCH):
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            sys.exit(f"{name} is required but not installed: pip install -e . first")
        pins[name] = dist.version.split("+")[0]  # 2.13.0+cpu -> 2.13.0: either build matches
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            if sub_req.marker is None or sub_req.marker.evaluate(IMAGE_ENV):
                todo.append(Requirement(str(sub_req).split(";")[0]))
        for extra in req.extras:
            for sub in dist.requires or []:
                sub_req = Requirement(sub)
                if sub_req.marker is not None and sub_req.marker.evaluate({**IMAGE_ENV, "extra": extra}):
                    todo.append(Requirement(str(sub_req).split(";")[0]))
    return pins


def main() -> None:
    print("# Pinned runtime dependencies of the container image (see Dockerfile).")
    print("# Regenerate: python deploy/docker/pin_requirements.py > deploy/docker/requirements.txt")
    for name, version in sorted(runtime_pins().items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
