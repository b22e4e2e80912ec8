"""The kernel seam (model/kernels/): every backend this machine offers against the reference,
op by op and as a whole model, on random checkpoints of odd shapes; the choice of backend
(auto, forced, unknown, unavailable, off the CPU); the startup self-check and its fallback.
(The guard that no tensor is made without a device is tests/test_device_guard.py.)"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
from test_model_parity import SHAPES, SMALL_VOCAB, VOCAB, max_relative_error, prefill_meta, random_prompt

import model.kernels.select as select
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.types import SamplingParams
from model.batch import BatchMetadata
from model.checkpoint import make_checkpoint
from model.config import ModelConfig
from model.generate import greedy_generate
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
from model.kernels.check import TOLERANCE
from model.layers import ExpertWeights, route
from model.loader import load_model
from model.paged_attention import build_plan
from model.transformer import GptOssModel

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
HERE = available_backends(CPU, torch.float32)  # the reference, plus native-cpu where it loads
# The whole-model comparisons of the reference with itself would prove nothing.
OTHERS = [name for name in HERE if name != REFERENCE]
DTYPES = (torch.float32, torch.bfloat16)


def backend(name: str, dtype: torch.dtype) -> Kernels:
    """The backend itself, without selection or self-check: a parity test must never end up
    comparing the reference with itself because of a fallback."""
    return BACKENDS[name](CPU, dtype)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kernels")
    return {
        shape: make_checkpoint(root / shape, preset="tiny", seed=11 + i, **SHAPES[shape], **SMALL_VOCAB)
        for i, shape in enumerate(SHAPES)
    }


@pytest.fixture(scope="module")
def reference_model(checkpoints) -> Callable[[str, torch.dtype], GptOssModel]:
    """shape, dtype -> that checkpoint loaded with the reference kernels (once)."""
    loaded: dict[tuple[str, torch.dtype], GptOssModel] = {}

    def get(shape: str, dtype: torch.dtype) -> GptOssModel:
        if (shape, dtype) not in loaded:
            loaded[shape, dtype] = load_model(checkpoints[shape], dtype=dtype)
        return loaded[shape, dtype]

    return get


# -- ops ---------------------------------------------------------------------------------------------


def fresh_experts(experts: ExpertWeights, dense: bool, dtype: torch.dtype) -> ExpertWeights:
    """A new object over the same tensors, so that one backend's preparation never shows
    in another's."""
    copy = dataclasses.replace(experts)
    if dense:
        copy.dequantize_all(dtype)
    return copy


@pytest.mark.parametrize("rows", [1, 7, 50])  # decode, small batch, a prefill chunk
@pytest.mark.parametrize("dense", [False, True], ids=["packed", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", HERE)
def test_moe_matches_the_reference(reference_model, name, shape, dtype, dense, rows):
    model = reference_model(shape, dtype)
    config = model.config
    ours, ref = backend(name, dtype), ReferenceKernels(CPU, dtype)
    layer = model.weights.layers[0]
    x = torch.randn(rows, config.hidden_size, generator=torch.Generator().manual_seed(rows)).to(dtype)
    weights, ids = route(x, layer.router_weight, layer.router_bias, config.experts_per_token)
    ours_experts = ours.prepare_experts(fresh_experts(layer.experts, dense, dtype), config)
    ref_experts = ref.prepare_experts(fresh_experts(layer.experts, dense, dtype), config)
    got = ours.moe(x, weights, ids, ours_experts, config)
    expected = ref.moe(x, weights, ids, ref_experts, config)
    assert got.dtype == dtype and got.shape == x.shape
    assert max_relative_error(got.float(), expected.float()) <= TOLERANCE[dtype]
    out = torch.full_like(x, float("nan"))  # every element must be written
    assert ours.moe(x, weights, ids, ours_experts, config, out=out) is out
    assert torch.equal(out, got)


def batch_of(seqs: list[tuple[int, int]], block_size: int, window: int | None, cached: bool):
    """(context, new tokens) per sequence -> meta and a block table whose physical blocks are
    scattered (a permutation), with -1 where a block already left the window (the engine
    frees those: a sliding layer must never read them)."""
    query_lens = [n for _, n in seqs]
    context_lens = [c for c, _ in seqs]
    positions = torch.cat([torch.arange(c, c + n) for c, n in seqs])
    starts = torch.tensor([0, *query_lens]).cumsum(0)
    widths = [-(-(c + n) // block_size) for c, n in seqs]
    physical = torch.randperm(sum(widths), generator=torch.Generator().manual_seed(len(seqs))).tolist()
    table = torch.full((len(seqs), max(widths)), -1, dtype=torch.int32)
    for s, (c, _) in enumerate(seqs):
        first_needed = 0 if window is None else max(0, c - window + 1)
        for b in range(widths[s]):
            block = physical.pop()
            if (b + 1) * block_size - 1 >= first_needed:
                table[s, b] = block
    meta = BatchMetadata(
        positions=positions,
        query_start=starts,
        context_lens=torch.tensor(context_lens),
        full_block_table=table if cached else None,
        sliding_block_table=table if cached else None,
        logits_indices=starts[1:] - 1,
        query_lens_cpu=query_lens,
        context_lens_cpu=context_lens,
    )
    return meta, table if cached else None, sum(widths)


ATTENTION_CASES = {
    "prefill": [(0, 13)],  # no cache: the sequence's own tokens are its keys
    "chunk": [(11, 9)],  # a prefill chunk after cached tokens
    "decode": [(3, 1), (17, 1), (30, 1)],
    "mixed": [(0, 6), (11, 9), (17, 1), (30, 1), (2, 1)],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", HERE)
def test_attention_matches_the_reference(name, shape, case, window, dtype):
    c = SHAPES[shape]
    heads, kv_heads, d = c["num_heads"], c["num_kv_heads"], c["head_dim"]
    block_size = 4
    cached = case != "prefill"
    meta, table, num_blocks = batch_of(ATTENTION_CASES[case], block_size, window, cached)
    plan = build_plan(meta, table, block_size, window)
    g = torch.Generator().manual_seed(3)
    t = meta.positions.shape[0]
    q, k, v = (torch.randn(t, n, d, generator=g).to(dtype) for n in (heads, kv_heads, kv_heads))
    sinks = torch.randn(heads, generator=g)
    caches = [torch.randn(kv_heads, num_blocks, block_size, d, generator=g).to(dtype) for _ in range(2)]
    ours_caches = [x.clone() for x in caches] if cached else [None, None]
    ref_caches = [x.clone() for x in caches] if cached else [None, None]
    scale = d**-0.5
    got = backend(name, dtype).attention(plan, q, k, v, *ours_caches, sinks, scale)
    expected = ReferenceKernels(CPU, dtype).attention(plan, q, k, v, *ref_caches, sinks, scale)
    assert got.dtype == dtype and max_relative_error(got, expected) <= TOLERANCE[dtype]
    if cached:
        assert all(torch.equal(a, b) for a, b in zip(ours_caches, ref_caches, strict=True))
        assert not torch.equal(ref_caches[0], caches[0])  # the new keys were written
    out = torch.full_like(q, float("nan"))
    assert backend(name, dtype).attention(plan, q, k, v, *ours_caches, sinks, scale, out=out) is out
    assert torch.equal(out, got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", HERE)
def test_linear_and_lm_head_match_the_reference(reference_model, name, dtype):
    model = reference_model("3layers-6experts-top2-gqa3", dtype)
    w, layer = model.weights, model.weights.layers[0]
    ours, ref = backend(name, dtype), ReferenceKernels(CPU, dtype)
    assert isinstance(layer.qkv_weight, torch.Tensor)
    for rows in (1, 5, 40):  # decode, a small batch, a prefill chunk
        x = torch.randn(rows, model.config.hidden_size, generator=torch.Generator().manual_seed(rows)).to(
            dtype
        )
        expected = ref.linear(x, layer.qkv_weight, layer.qkv_bias)
        # The weight as loaded, and as the backend lays it out for itself at load.
        for weight in (layer.qkv_weight, ours.prepare_linear(layer.qkv_weight)):
            got = ours.linear(x, weight, layer.qkv_bias)
            assert got.dtype == dtype and got.shape == expected.shape
            assert max_relative_error(got.float(), expected.float()) <= TOLERANCE[dtype]
    heads = [dataclasses.replace(w, unembedding_prepacked=None) for _ in range(2)]
    ours.prepare_lm_head(heads[0])
    ref.prepare_lm_head(heads[1])
    got, expected = ours.lm_head(x, heads[0]), ref.lm_head(x, heads[1])
    assert got.dtype == dtype and got.shape == (40, VOCAB)
    assert max_relative_error(got.float(), expected.float()) <= TOLERANCE[dtype]


# -- whole models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", OTHERS)
def test_model_matches_the_reference_and_gives_the_same_greedy_tokens(checkpoints, name, shape):
    """float32: prefill logits without a cache, prefill + decode through the paged cache
    past the sliding window, and an engine serving a mixed batch (chunked prefills beside
    decodes): the parity tests' tolerance on logits, the same greedy tokens."""
    ours = load_model(checkpoints[shape], dtype=torch.float32, kernels=name)
    ref = load_model(checkpoints[shape], dtype=torch.float32, kernels=REFERENCE)
    assert ours.kernels.name == name
    seed = list(SHAPES).index(shape)
    prompt = random_prompt(seed, 40)  # longer than every window but the 128 one
    meta = prefill_meta(len(prompt))
    got = ours(torch.tensor(prompt), meta, None)
    expected = ref(torch.tensor(prompt), meta, None)
    assert max_relative_error(got, expected) < 1e-5

    tokens, cached = greedy_generate(ours, prompt, 16, block_size=4)
    ref_tokens, ref_cached = greedy_generate(ref, prompt, 16, block_size=4)
    assert tokens == ref_tokens and len(set(tokens)) > 1
    assert cached is not None and ref_cached is not None
    assert max_relative_error(cached, ref_cached) < 1e-5

    prompts = {f"r{i}": random_prompt(100 + i, n) for i, n in enumerate((3, 21, 34, 9))}
    served = {}
    for label, model in (("ours", ours), ("ref", ref)):
        engine = LLMEngine(
            EngineConfig(
                model_dir="unused", block_size=4, kv_cache_memory=1 << 20, max_num_batched_tokens=16
            ),
            model=model,
        )
        for rid, ids in prompts.items():
            engine.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=8))
        out: dict[str, list[int]] = {rid: [] for rid in prompts}
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id] += o.token_ids
        served[label] = out
    assert served["ours"] == served["ref"]


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


@pytest.fixture(scope="module")
def tiny(reference_model) -> GptOssModel:
    return reference_model("3layers-6experts-top2-gqa3", torch.float32)


@pytest.mark.parametrize("name", HERE)
def test_every_backend_here_passes_its_self_check(tiny, name):
    assert self_check(backend(name, torch.float32), ReferenceKernels(CPU, torch.float32), tiny.weights, tiny.config, torch.float32) is None  # fmt: skip


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
