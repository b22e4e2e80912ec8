"""Which backend runs: by name (``--kernels``), or ``auto`` by device and CPU features.

``BACKENDS`` maps each name to a factory, in order of preference; ``auto`` takes the first
that can run here and passes its self-check (or a slower variant of it that does: the native
CPU backend one CPU path lower), else ``reference`` (a native library not yet
built on this machine is built in the background for the next start, not waited for). The native CPU backend
(``model/kernels/native_cpu/``) is imported lazily, and only for a CPU device, so a GPU
machine never loads it; it decides itself whether this CPU suits it (``available()``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING

import torch

from .base import Kernels
from .check import self_check
from .reference import REFERENCE, ReferenceKernels

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..transformer import ModelWeights

log = logging.getLogger(__name__)

AUTO = "auto"
NATIVE_CPU = "native-cpu"
NATIVE_CPU_MODULE = "model.kernels.native_cpu"
# Flags worth naming in the log line of the choice (what a native CPU kernel dispatches on).
LOGGED_CPU_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
)
# Where /proc/cpuinfo is missing: what torch's own dispatcher found (its AVX512 level needs
# these four).
TORCH_CAPABILITY_FEATURES = {
    "AVX2": ("avx2", "fma"),
    "AVX512": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
}


class BackendUnavailable(Exception):
    """A backend cannot run on this device, dtype or machine; the message says why."""


KernelsFactory = Callable[[torch.device, torch.dtype], Kernels]


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as the kernel names them (``avx2``, ``avx512f``,
    ``avx512_bf16``, ``amx_bf16``...): /proc/cpuinfo's ``flags`` (``Features`` on ARM)
    where it exists, else the level torch's dispatcher detected."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset(TORCH_CAPABILITY_FEATURES.get(torch.backends.cpu.get_cpu_capability(), ()))


def _reference(device: torch.device, dtype: torch.dtype) -> Kernels:
    return ReferenceKernels(device, dtype)


def _load_native_cpu_module() -> ModuleType:
    return importlib.import_module(NATIVE_CPU_MODULE)


def _native_cpu(device: torch.device, dtype: torch.dtype) -> Kernels:
    """native_cpu's packed-MXFP4 experts (``native.py``) where its module loads and says
    ``available()`` (its first call on a machine compiles the extension, once)."""
    if device.type != "cpu":
        raise BackendUnavailable(f"runs on the CPU only, not {device.type}")
    from .native import NATIVE_DTYPES, NativeCpuKernels

    if dtype not in NATIVE_DTYPES:
        raise BackendUnavailable(f"computes in {' or '.join(str(d) for d in NATIVE_DTYPES)}, not {dtype}")
    try:
        native_cpu = _load_native_cpu_module()
    except ImportError as exc:
        raise BackendUnavailable(f"not built ({exc})") from exc
    if not hasattr(native_cpu, "available"):
        raise BackendUnavailable(f"{NATIVE_CPU_MODULE} has no available()")

    if not native_cpu.available():
        reason = getattr(native_cpu, "unavailable_reason", lambda: None)()
        raise BackendUnavailable(f"not available here ({reason or 'no reason given'})")
    return NativeCpuKernels(device, dtype, native_cpu)


def _build_started() -> bool:
    """For ``auto``: True when the native CPU library is not built on this machine yet, after
    starting its build on a background thread. A first start must not wait a minute for a
    compiler; the next start finds the library built and loads it in milliseconds."""
    try:
        native_cpu = _load_native_cpu_module()
    except ImportError:
        return False  # the factory says why
    if not hasattr(native_cpu, "is_built") or native_cpu.is_built():
        return False
    native_cpu.build_in_background()
    return True


# Preference order: auto tries them in turn; the reference is last and always runs.
BACKENDS: Mapping[str, KernelsFactory] = MappingProxyType({NATIVE_CPU: _native_cpu, REFERENCE: _reference})


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Names of the backends that can run on this device and dtype here, in preference
    order (the reference always among them)."""
    names = []
    for name, factory in BACKENDS.items():
        try:
            factory(torch.device(device), dtype)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


def _features_text(device: torch.device) -> str:
    if device.type != "cpu":
        return device.type
    found = cpu_features()
    shown = [f for f in LOGGED_CPU_FEATURES if f in found]
    return "cpu features: " + (" ".join(shown) if shown else "none of " + " ".join(LOGGED_CPU_FEATURES))


def select_kernels(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype,
    config: ModelConfig,
    weights: ModelWeights | None = None,
) -> Kernels:
    """The backend to run: ``name`` is ``auto`` or a key of ``BACKENDS``.

    A named backend that cannot run here is a ValueError naming those that can. With
    ``weights`` (the loaded, not yet prepared model), a backend other than the reference
    first runs its self-check against the reference: under ``auto`` a failure is a warning
    and the reference runs instead; a backend forced by name that fails is a RuntimeError
    (a benchmark or test that asked for it must not silently measure another one).
    """
    device = torch.device(device)
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"unknown kernels {name!r}: choose {AUTO} or one of {', '.join(BACKENDS)}")
    reference = ReferenceKernels(device, dtype)
    notes = [_features_text(device)]
    if name == AUTO:
        candidate: Kernels = reference
        for backend, factory in BACKENDS.items():
            try:
                if backend == NATIVE_CPU and device.type == "cpu" and _build_started():
                    notes.append(f"{backend}: not built on this machine yet, building in the background for"
                                 f" the next start (--kernels {backend} waits for the build)")  # fmt: skip
                    continue
                candidate = factory(device, dtype)
                break
            except BackendUnavailable as exc:
                notes.append(f"{backend}: {exc}")
            except Exception as exc:  # a broken build must not stop the server: use the next
                log.warning("kernels %s failed to start (%s: %s)", backend, type(exc).__name__, exc)
                notes.append(f"{backend}: failed to start")
    else:
        try:
            candidate = BACKENDS[name](device, dtype)
        except BackendUnavailable as exc:
            available = ", ".join(available_backends(device, dtype))
            raise ValueError(
                f"kernels {name!r} cannot run on {device} in {dtype} ({exc}); available here: {available}"
            ) from exc
    if candidate.name != REFERENCE and weights is not None:
        failure = self_check(candidate, reference, weights, config, dtype)
        if failure is not None and name != AUTO:
            raise RuntimeError(f"kernels {name!r} failed the self-check against the reference: {failure}")
        # Under auto, a backend's slower variants first (fallback()), then the reference.
        while failure is not None:
            failed = _variant(candidate)
            lower = candidate.fallback()
            instead = _variant(lower) if lower is not None else REFERENCE
            log.warning(
                "kernels %s failed the self-check against the reference (%s); using %s instead",
                failed,
                failure,
                instead,
            )
            notes.append(f"{failed}: failed its self-check")
            if lower is None:
                candidate, failure = reference, None
            else:
                candidate, failure = lower, self_check(lower, reference, weights, config, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    log.info(
        "kernels: %s (%s on %s, %s; %s)", _variant(candidate), name, device, dtype_name, "; ".join(notes)
    )
    return candidate


def _variant(kernels: Kernels) -> str:
    """A backend's name, with its CPU path where it has one (``native-cpu [avx512_vnni]``)."""
    isa = getattr(kernels, "isa", None)
    return f"{kernels.name} [{isa}]" if isinstance(isa, str) else kernels.name
