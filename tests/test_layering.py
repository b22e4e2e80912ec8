"""Dependencies point one way (ARCHITECTURE.md): server -> harmony, engine; engine -> model.

Read from the source with ast, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"server", "harmony", "engine", "model", "demo"}
ALLOWED = {
    "server": {"server", "harmony", "engine"},
    "harmony": {"harmony"},
    "engine": {"engine", "model"},
    "model": {"model"},
    # The build step of the embedded demonstration model: the runtime never imports it.
    "demo": {"demo", "harmony", "engine", "model"},
}
FORBIDDEN_THIRD_PARTY = {
    "harmony": {"torch", "fastapi", "pydantic", "starlette"},
    "engine": {"fastapi", "starlette", "uvicorn"},
    "model": {"fastapi", "starlette", "uvicorn", "transformers"},
}


def imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_imports_only_what_it_may(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        imported = imported_top_levels(path)
        wrong = (imported & PACKAGES) - ALLOWED[package]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"
        banned = imported & FORBIDDEN_THIRD_PARTY.get(package, set())
        assert not banned, f"{path.relative_to(ROOT)} imports {sorted(banned)}"
