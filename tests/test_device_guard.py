"""So the same code runs on CUDA: model/ and engine/ make no tensor without saying on which
device (a torch factory without device= puts it on the CPU), except where a host tensor is
right by design, each with its reason."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# torch factories that make a tensor on the default device unless told otherwise (the *_like
# and Tensor.new_* ones inherit their argument's device and are fine).
FACTORIES = {
    "arange", "as_tensor", "empty", "empty_strided", "eye", "full", "Generator", "linspace",
    "logspace", "normal", "ones", "rand", "randint", "randn", "randperm", "range", "tensor", "zeros",
}  # fmt: skip
# (file, enclosing function or "*" for the whole file) -> why a host tensor is right there.
HOST_BY_DESIGN = {
    ("model/checkpoint.py", "*"): "random checkpoints are generated on the host and written to files",
    ("model/safetensors_reader.py", "*"): "reads files on the host (0-d dtype probes, empty tensors); the loader moves them",
    ("model/safetensors_writer.py", "*"): "writes files from host tensors (a 0-d probe of the element size)",
    ("model/kv_cache.py", "KVCache.bytes_per_block"): "a 0-d probe of the dtype's element size, never data",
    ("model/layers.py", "YarnRope.__init__"): "frequencies in fp32 on the host, the same bits on every device, then moved",
    ("model/mxfp4.py", "_byte_pair_values"): "the decode table is built once on the host (exact), then cached per device",
    ("model/mxfp4.py", "_scale_values"): "the decode table is built once on the host (exact), then cached per device",
    ("engine/sampler.py", "Sampler.new_masks"): "the grammar library fills token masks in host memory on the mask worker",
}  # fmt: skip


def host_factory_calls() -> list[tuple[str, str, str, int]]:
    """(file, enclosing function, factory, line) of every torch factory call in model/ and
    engine/ without a device= keyword."""
    found = []

    class Visitor(ast.NodeVisitor):
        def __init__(self, path: str) -> None:
            self.path, self.scope = path, []

        def visit_scope(self, node: ast.AST) -> None:
            self.scope.append(node.name)  # type: ignore[attr-defined]
            self.generic_visit(node)
            self.scope.pop()

        visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_scope

        def visit_Call(self, node: ast.Call) -> None:
            f = node.func
            if (
                isinstance(f, ast.Attribute)
                and isinstance(f.value, ast.Name)
                and f.value.id == "torch"
                and f.attr in FACTORIES
                and "device" not in {k.arg for k in node.keywords}
            ):
                found.append((self.path, ".".join(self.scope) or "<module>", f.attr, node.lineno))
            self.generic_visit(node)

    for package in ("model", "engine"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            Visitor(rel).visit(ast.parse(path.read_text(), filename=rel))
    return found


def test_every_new_tensor_names_its_device():
    """So the same code runs on CUDA: a tensor made without device= lands on the CPU."""
    calls = host_factory_calls()
    unexplained = [
        f"{path}:{line} torch.{name} in {scope}"
        for path, scope, name, line in calls
        if (path, scope) not in HOST_BY_DESIGN and (path, "*") not in HOST_BY_DESIGN
    ]
    assert not unexplained, "pass device= (or add a reasoned HOST_BY_DESIGN entry):\n" + "\n".join(
        unexplained
    )
    used = {(path, scope) for path, scope, _, _ in calls} | {(path, "*") for path, _, _, _ in calls}
    assert set(HOST_BY_DESIGN) <= used, f"stale entries: {set(HOST_BY_DESIGN) - used}"
