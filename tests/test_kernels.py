"""The kernel seam (model/kernels/): every backend this machine offers against the reference,
op by op and as a whole model, on random checkpoints of odd shapes. (Choosing a backend and
its self-check: tests/test_kernels_select.py; the guard that no tensor is made without a
device: tests/test_device_guard.py.)"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_model_parity import SHAPES, SMALL_VOCAB, VOCAB, max_relative_error, prefill_meta, random_prompt

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.types import SamplingParams
from model.batch import BatchMetadata
from model.checkpoint import make_checkpoint
from model.generate import greedy_generate
from model.kernels import (
    BACKENDS,
    REFERENCE,
    Kernels,
    ReferenceKernels,
    available_backends,
)
from model.kernels.check import TOLERANCE
from model.layers import ExpertWeights, route
from model.loader import load_model
from model.paged_attention import build_plan
from model.transformer import GptOssModel

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
