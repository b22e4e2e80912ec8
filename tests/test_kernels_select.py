"""Choosing a kernel backend (model/kernels/select.py): auto, forced, unknown, unavailable, off
the CPU; the startup self-check and its fallback to the reference; the native build's cache
and CPU features. (Op-by-op and whole-model parity is tests/test_kernels.py.)"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
from test_model_parity import SHAPES, SMALL_VOCAB, VOCAB, prefill_meta

import model.kernels.select as select
from engine.config import EngineConfig
from model.checkpoint import make_checkpoint
from model.config import ModelConfig
from model.kernels import (
    BACKENDS,
    REFERENCE,
    BackendUnavailable,
    Kernels,
    ReferenceKernels,
    available_backends,
    cpu_features,
    select_kernels,
    self_check,
)
from model.loader import load_model
from model.transformer import GptOssModel

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
HERE = available_backends(CPU, torch.float32)  # the reference, plus native-cpu where it loads
TINY = "3layers-6experts-top2-gqa3"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("select")
    return {TINY: make_checkpoint(root / TINY, preset="tiny", seed=11, **SHAPES[TINY], **SMALL_VOCAB)}


@pytest.fixture(scope="module")
def tiny(checkpoints) -> GptOssModel:
    return load_model(checkpoints[TINY], dtype=torch.float32)


# -- the choice of backend -----------------------------------------------------------------------------


class ScaledMoe(ReferenceKernels):
    """Wrong results: the experts' output off by 1%."""

    name = "scaled-moe"

    def moe(self, x, routing_weights, expert_ids, experts, config, out=None):
        return super().moe(x, routing_weights, expert_ids, experts, config, out) * 1.01


class CrashingAttention(ReferenceKernels):
    name = "crashing-attention"

    def attention(self, *args, **kwargs):
        raise RuntimeError("illegal instruction, pretend")


class SameAsReference(ReferenceKernels):
    name = "same"


def only(monkeypatch: pytest.MonkeyPatch, cls: type[ReferenceKernels]) -> None:
    """BACKENDS with just this backend ahead of the reference."""
    backends = {cls.name: cls, REFERENCE: ReferenceKernels}
    monkeypatch.setattr(select, "BACKENDS", MappingProxyType(backends))


@pytest.mark.parametrize("name", HERE)
def test_every_backend_here_passes_its_self_check(tiny, name):
    assert self_check(BACKENDS[name](CPU, torch.float32), ReferenceKernels(CPU, torch.float32), tiny.weights, tiny.config, torch.float32) is None  # fmt: skip


@pytest.mark.parametrize(
    ("broken", "reason"), [(ScaledMoe, "moe"), (CrashingAttention, "illegal instruction")]
)
def test_a_broken_backend_falls_back_to_the_reference_with_a_warning(
    monkeypatch, caplog, checkpoints, tiny, broken, reason
):
    only(monkeypatch, broken)
    with caplog.at_level(logging.INFO, logger="model.kernels"):
        chosen = select_kernels("auto", CPU, torch.float32, tiny.config, tiny.weights)
    assert chosen.name == REFERENCE
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and broken.name in warnings[0] and reason in warnings[0], warnings
    assert "self-check" in warnings[0]
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info and info[-1].startswith("kernels: reference (auto on cpu, float32")
    # Through the loader too, and the model it gives still runs.
    model = load_model(checkpoints["3layers-6experts-top2-gqa3"], dtype=torch.float32, kernels="auto")
    assert model.kernels.name == REFERENCE
    assert model(torch.tensor([1, 2, 3]), prefill_meta(3), None).shape == (3, VOCAB)
    # Forced by name, a failing backend is an error, not a silent substitute.
    with pytest.raises(RuntimeError, match=f"{broken.name}.*self-check"):
        select_kernels(broken.name, CPU, torch.float32, tiny.config, tiny.weights)


class TwoSpeeds(ReferenceKernels):
    """A backend wrong on its fast CPU path and right on the slower one below it (or, with
    ``broken_below``, wrong there too), as ``fallback`` hands them out."""

    name = "two-speeds"
    broken_below = False

    def __init__(self, device, dtype, isa="fast"):
        super().__init__(device, dtype)
        self.isa = isa

    def fallback(self):
        return type(self)(self.device, self.dtype, "slow") if self.isa == "fast" else None

    def moe(self, x, routing_weights, expert_ids, experts, config, out=None):
        result = super().moe(x, routing_weights, expert_ids, experts, config, out)
        return result * 1.01 if self.isa == "fast" or self.broken_below else result


class TwoSpeedsBoth(TwoSpeeds):
    broken_below = True


def test_auto_tries_the_slower_paths_of_a_failing_backend_before_the_reference(monkeypatch, caplog, tiny):
    only(monkeypatch, TwoSpeeds)
    with caplog.at_level(logging.INFO, logger="model.kernels"):
        chosen = select_kernels("auto", CPU, torch.float32, tiny.config, tiny.weights)
    assert (chosen.name, chosen.isa) == ("two-speeds", "slow")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("kernels two-speeds [fast] failed the self-check") and "moe" in warnings[0]
    assert warnings[0].endswith("using two-speeds [slow] instead")
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info[-1].startswith("kernels: two-speeds [slow] (auto on cpu, float32")
    # Every variant failing ends on the reference, one warning per variant.
    only(monkeypatch, TwoSpeedsBoth)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="model.kernels"):
        chosen = select_kernels("auto", CPU, torch.float32, tiny.config, tiny.weights)
    assert chosen.name == REFERENCE
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(" failed")[0] for w in warnings] == [
        "kernels two-speeds [fast]",
        "kernels two-speeds [slow]",
    ]
    assert warnings[-1].endswith("using reference instead")
    # Forced by name, the first failure is the error: no substitute, not even a slower path.
    with pytest.raises(RuntimeError, match=r"two-speeds.*self-check"):
        select_kernels("two-speeds", CPU, torch.float32, tiny.config, tiny.weights)


@pytest.mark.skipif("native-cpu" not in HERE, reason="the native CPU backend does not load here")
def test_native_cpu_passes_its_self_check_on_every_cpu_path_here_and_keeps_to_it(monkeypatch, tiny):
    """Each path ``fallback`` can step down to, from this CPU's best to the portable one, is
    right, and a capped backend runs its experts on that path and no kernel above it."""
    import model.kernels.native_cpu as native_cpu
    from model.kernels.native import NativeCpuKernels

    reference = ReferenceKernels(CPU, torch.float32)
    asked = []
    real_moe = native_cpu.moe_experts

    def moe_experts(*args, **kwargs):
        asked.append(kwargs.get("isa"))
        return real_moe(*args, **kwargs)

    monkeypatch.setattr(native_cpu, "moe_experts", moe_experts)
    kernels = BACKENDS["native-cpu"](CPU, torch.float32)
    assert kernels.isa == native_cpu.isa()
    seen = []
    while kernels is not None:
        asked.clear()
        assert self_check(kernels, reference, tiny.weights, tiny.config, torch.float32) is None, kernels.isa
        assert asked and set(asked) == {kernels.isa}
        level = native_cpu.ISAS.index(kernels.isa)
        assert kernels.bf16_dot == (
            native_cpu.bf16_dot_available() and level >= native_cpu.ISAS.index("avx512_bf16")
        )
        assert kernels.screens == (
            native_cpu.screen_available() and level >= native_cpu.ISAS.index("avx512_vnni")
        )
        seen.append(kernels.isa)
        kernels = kernels.fallback()
    assert seen == list(reversed(native_cpu.ISAS[: native_cpu.ISAS.index(native_cpu.isa()) + 1]))
    # A cap above what the CPU runs is the CPU's best.
    assert NativeCpuKernels(CPU, torch.float32, native_cpu, native_cpu.ISAS[-1]).isa == native_cpu.isa()


@pytest.mark.skipif("native-cpu" not in HERE, reason="the native CPU backend does not load here")
@pytest.mark.parametrize("cap", [None, "generic"])  # this CPU's best path; the portable one alone
def test_auto_steps_native_cpu_down_one_path_when_its_best_fails(monkeypatch, caplog, tiny, cap):
    import model.kernels.native_cpu as native_cpu

    if cap is not None:
        monkeypatch.setenv("GPTOSS_NATIVE_MOE_ISA", cap)
    best = native_cpu.isa()
    level = native_cpu.ISAS.index(best)
    real_check = select.self_check

    def best_path_broken(candidate, reference, weights, config, dtype):
        if getattr(candidate, "isa", None) == best:
            return "moe (37 rows): max relative error 0.5 > 1e-05, pretend"
        return real_check(candidate, reference, weights, config, dtype)

    monkeypatch.setattr(select, "self_check", best_path_broken)
    with caplog.at_level(logging.INFO, logger="model.kernels"):
        chosen = select_kernels("auto", CPU, torch.float32, tiny.config, tiny.weights)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if level == 0:  # a CPU with the portable path only: nothing below it but the reference
        assert chosen.name == REFERENCE
        assert len(warnings) == 1 and f"native-cpu [{best}] failed" in warnings[0]
        assert warnings[0].endswith("using reference instead")
        return
    lower = native_cpu.ISAS[level - 1]
    assert (chosen.name, chosen.isa) == ("native-cpu", lower)
    assert (
        len(warnings) == 1
        and f"native-cpu [{best}] failed" in warnings[0]
        and f"[{lower}] instead" in warnings[0]
    )


def test_auto_takes_the_first_backend_that_passes(monkeypatch, caplog, tiny):
    only(monkeypatch, SameAsReference)
    with caplog.at_level(logging.INFO, logger="model.kernels"):
        chosen = select_kernels("auto", CPU, torch.float32, tiny.config, tiny.weights)
    assert chosen.name == "same"
    assert any(r.getMessage().startswith("kernels: same (auto on cpu") for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_auto_is_the_best_backend_here_and_reference_is_always_there():
    assert HERE[-1] == REFERENCE and list(BACKENDS)[-1] == REFERENCE
    assert select_kernels("auto", CPU, torch.float32, ModelConfig()).name == HERE[0]


def test_unknown_and_unavailable_backends_are_errors(monkeypatch, checkpoints, tiny):
    with pytest.raises(ValueError, match=r"'nope'.*auto.*reference"):
        select_kernels("nope", CPU, torch.float32, tiny.config)
    with pytest.raises(ValueError, match="nope"):
        load_model(checkpoints["3layers-6experts-top2-gqa3"], dtype=torch.float32, kernels="nope")

    def needs_a_gpu(device: torch.device, dtype: torch.dtype) -> Kernels:
        raise BackendUnavailable("needs a GPU")

    monkeypatch.setattr(
        select, "BACKENDS", MappingProxyType({"gpu-only": needs_a_gpu, REFERENCE: ReferenceKernels})
    )
    with pytest.raises(
        ValueError, match=r"'gpu-only' cannot run on cpu.*needs a GPU.*available here: reference"
    ):
        select_kernels("gpu-only", CPU, torch.float32, tiny.config)
    assert select_kernels("auto", CPU, torch.float32, tiny.config).name == REFERENCE


def test_nothing_native_is_imported_off_the_cpu(monkeypatch, tiny):
    def must_not_load():
        raise AssertionError("native_cpu imported for a non-CPU device")

    monkeypatch.setattr(select, "_load_native_cpu_module", must_not_load)
    for device in (torch.device("cuda"), torch.device("cuda:1"), torch.device("meta")):
        assert select_kernels("auto", device, torch.bfloat16, tiny.config).name == REFERENCE
        assert available_backends(device, torch.bfloat16) == [REFERENCE]
        with pytest.raises(ValueError, match="CPU only"):
            select_kernels("native-cpu", device, torch.bfloat16, tiny.config)
    # Importing the model, the engine and the selection loads nothing native either.
    code = (
        "import sys, model.loader, model.kernels, engine.llm_engine\n"
        "assert not [m for m in sys.modules if m.startswith('model.kernels.nat')], sys.modules.keys()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_auto_never_waits_for_a_compiler(monkeypatch, caplog, tiny):
    """A machine that has not built the native library yet: ``auto`` starts on the reference
    at once and builds it in the background; forced by name, the build is waited for."""
    import model.kernels.native_cpu as native_cpu

    started = []
    monkeypatch.setattr(native_cpu, "is_built", lambda: False)
    monkeypatch.setattr(native_cpu, "build_in_background", lambda: started.append(True))
    with caplog.at_level(logging.INFO, logger="model.kernels"):
        chosen = select_kernels("auto", CPU, torch.float32, tiny.config, tiny.weights)
    assert chosen.name == REFERENCE and started == [True]
    assert any("building in the background" in r.getMessage() for r in caplog.records)
    if "native-cpu" in HERE:
        assert (
            select_kernels("native-cpu", CPU, torch.float32, tiny.config, tiny.weights).name == "native-cpu"
        )
        assert started == [True]


def test_a_stale_build_lock_is_removed(tmp_path, monkeypatch):
    """torch's build lock, left by a process killed mid-build, must not block every later build."""
    import os
    import time

    import model.kernels.native_cpu as native_cpu
    import model.kernels.native_cpu.build as build

    monkeypatch.setenv("GPTOSS_KERNEL_CACHE", str(tmp_path))
    build_dir, _ = build._library()
    build_dir.mkdir(parents=True)
    lock = build_dir / "lock"
    lock.write_text("")
    old = time.time() - 2 * build._STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    state = build._State()
    monkeypatch.setattr(build, "_state", state)
    monkeypatch.setattr(
        "torch.utils.cpp_extension.load", lambda **kw: (_ for _ in ()).throw(OSError("no build here"))
    )
    assert not native_cpu.available() and "no build here" in (native_cpu.unavailable_reason() or "")
    assert not lock.exists()


def test_cpu_features():
    features = cpu_features()
    assert isinstance(features, frozenset) and all(isinstance(f, str) for f in features)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        assert {"avx2", "avx512f"} <= features
    elif capability == "AVX2":
        assert "avx2" in features
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")]
        if flags:
            assert features == frozenset(flags[0].partition(":")[2].split())


def test_the_setting_names_the_backends():
    from server.settings import ServerSettings, engine_config, settings_declaration

    (kernels,) = [s for s in settings_declaration() if s.name == "kernels"]
    assert set(kernels.choices) == {"auto", *BACKENDS} and kernels.default == "auto" and kernels.engine
    assert kernels.env == "GPTOSS_KERNELS" and kernels.flag == "--kernels"
    assert EngineConfig(model_dir="/m").kernels == "auto"
    assert engine_config(ServerSettings(kernels="reference"), "/m").kernels == "reference"
