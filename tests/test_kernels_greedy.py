"""The greedy path: every backend's argmax is torch.argmax's (ties, NaN, infinities, odd widths);
the native bf16 linear and its fused argmax against fp32 maths; which batches count as plain
greedy; and an engine whose plain greedy rows take the LM head's argmax gives the tokens that the
sampler picks from the full logits."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampler import Sampler
from engine.sequence import Sequence
from engine.types import RequestMetrics, SamplingParams
from model.checkpoint import make_checkpoint
from model.kernels import BACKENDS, available_backends
from model.kernels import native_cpu as native
from model.kernels.check import TOLERANCE, max_relative_error
from model.loader import load_model

CPU = torch.device("cpu")
HERE = available_backends(CPU, torch.float32)
DTYPES = (torch.float32, torch.bfloat16)
needs_bf16_dot = pytest.mark.skipif(
    not native.bf16_dot_available(), reason="this CPU has no AVX-512 BF16 (the native linear's path)"
)


def awkward_logits(n: int, v: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows, some with repeated maxima, NaNs, infinities or all -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g).to(dtype)
    for r in range(n):
        kind = r % 6
        cols = torch.randint(0, v, (3,), generator=g).tolist()
        if kind == 1:  # a tie: the first index wins
            x[r, cols] = x[r].max() + 1
        elif kind == 2:
            x[r, cols[0]] = float("nan")
            x[r, cols[1]] = float("nan")
        elif kind == 3:
            x[r, cols[0]] = float("inf")
        elif kind == 4:
            x[r] = float("-inf")
        elif kind == 5:
            x[r] = x[r].round()  # many exact ties in bf16
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", HERE)
@pytest.mark.parametrize("v", [1, 5, 16, 17, 1023, 1025, 4099])
def test_every_backends_argmax_is_torch_argmax(name, dtype, v):
    ops = BACKENDS[name](CPU, dtype)
    for seed in range(3):
        x = awkward_logits(13, v, dtype, seed)
        assert torch.equal(ops.argmax(x), x.argmax(dim=-1)), (name, dtype, v, seed)


def fp32_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.float() @ w.float().T
    return y if b is None else y + b.float()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, **kw) -> torch.Tensor:
    return native.linear_interleaved(x, native.InterleavedLinear(w), b, **kw)


@needs_bf16_dot
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("h", [32, 40, 100, 640])
def test_native_linear_is_fp32_maths_rounded_once(h, bias):
    """Rows 1-9 and 13 (the interleaved kernel's 6-row tiles and their tails), outputs not a
    multiple of 16 or 64 (its groups of 16 and tiles of 4 groups, split between threads)."""
    g = torch.Generator().manual_seed(h)
    for n in (*range(1, 10), 13):
        for o in (1, 5, 37, 258, 1031):
            x = torch.randn(n, h, generator=g).bfloat16()
            w = (torch.randn(o, h, generator=g) / h**0.5).bfloat16()
            b = torch.randn(o, generator=g).bfloat16() if bias else None
            got = linear(x, w, b)
            assert got.dtype == torch.bfloat16 and got.shape == (n, o)
            assert max_relative_error(got, fp32_linear(x, w, b)) <= TOLERANCE[torch.bfloat16] / 4
            # The fused argmax is exactly the argmax of that bf16 result.
            ids = linear(x, w, b, argmax=True)
            assert torch.equal(ids, got.argmax(dim=-1)), (n, o, h)


@needs_bf16_dot
def test_native_fused_argmax_is_torch_argmax_on_awkward_rows():
    """Rows whose products tie, hold NaN or infinities (from x), or are all -inf (from the
    bias): the fused argmax is torch.argmax of the written result, at 1, 2 and 9 rows."""
    g = torch.Generator().manual_seed(5)
    h, o = 64, 1031
    w = torch.randint(-2, 3, (o, h), generator=g).bfloat16()  # integer maths: exact ties
    w[100:900:7] = w[3]  # rows equal to row 3: the same product
    for n in (1, 2, 9):
        x = torch.randint(-2, 3, (n, h), generator=g).bfloat16()
        if n > 1:
            x[1, 5] = float("nan")
        if n > 2:
            x[2, 7] = float("inf")
        b = torch.zeros(o)
        got = linear(x, w, b)
        assert torch.equal(linear(x, w, b, argmax=True), got.argmax(dim=-1)), n
        ninf = torch.full((o,), float("-inf"))
        assert torch.equal(linear(x, w, ninf, argmax=True), linear(x, w, ninf).argmax(dim=-1))


@needs_bf16_dot
def test_native_linear_writes_into_out_and_rejects_bad_shapes():
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(7, 64).bfloat16()
    out = torch.full((3, 7), float("nan"), dtype=torch.bfloat16)
    assert linear(x, w, None, out=out) is out
    assert not out.isnan().any()
    packed = native.InterleavedLinear(w)
    with pytest.raises(RuntimeError):
        native.linear_interleaved(torch.randn(3, 32).bfloat16(), packed)
    with pytest.raises(RuntimeError):
        native.linear_interleaved(x.float(), packed)
    with pytest.raises(ValueError):
        native.InterleavedLinear(torch.randn(7, 63).bfloat16())


def seq_with(**params) -> Sequence:
    return Sequence("r", [1, 2, 3], SamplingParams(**params), RequestMetrics(arrival_time=0.0))


def test_plain_greedy_is_greedy_with_nothing_read_from_the_logits():
    assert Sampler.plain_greedy([seq_with(temperature=0), seq_with(temperature=1e-6)])
    assert Sampler.plain_greedy([seq_with(temperature=0, min_tokens=0)])
    # Still short of min_tokens: the argmax stands unless it is a stop id (banned_rows).
    assert Sampler.plain_greedy([seq_with(temperature=0, min_tokens=3, stop_token_ids=[7])])
    for params in (
        {"temperature": 0.7},
        {"temperature": 0, "logprobs": 0},
        {"temperature": 0, "presence_penalty": 0.5},
        {"temperature": 0, "frequency_penalty": -0.5},
        {"temperature": 0, "repetition_penalty": 1.1},
        {"temperature": 0, "logit_bias": {5: 1.0}},
    ):
        assert not Sampler.plain_greedy([seq_with(temperature=0), seq_with(**params)]), params


def test_banned_rows_are_the_argmaxes_min_tokens_forbids():
    short = seq_with(temperature=0, min_tokens=2, stop_token_ids=[7, 9])
    done = seq_with(temperature=0, min_tokens=2, stop_token_ids=[7, 9])
    done.token_ids += [11, 12]
    free = seq_with(temperature=0, stop_token_ids=[7])
    seqs = [short, short, done, free]
    assert Sampler.banned_rows(seqs, [9, 8, 7, 7]) == [0]
    assert Sampler.banned_rows(seqs, [7, 9, 9, 5]) == [0, 1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("greedy") / "ck"
    make_checkpoint(path, preset="tiny", seed=3, vocab_size=4099, sliding_window=8)
    return str(path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", HERE)
def test_the_greedy_path_picks_the_samplers_tokens(checkpoint, name, dtype):
    """The same prompts, greedy, on one engine: plain (``Kernels.lm_head_argmax``) and with
    logprobs asked (full logits through the sampler), at batch sizes on both sides of the
    native projections' row limit."""
    model = load_model(checkpoint, dtype=dtype, kernels=name)
    prompts = [[(7 * i + 3 * j) % 4000 + 1 for j in range(5 + i)] for i in range(9)]
    served = {}
    for label, logprobs in (("plain", None), ("logprobs", 1)):
        engine = LLMEngine(
            EngineConfig(model_dir="unused", block_size=4, kv_cache_memory=1 << 21), model=model
        )
        out: dict[str, list[int]] = {}
        for batch in (prompts[:1], prompts[1:4], prompts):  # 1, 3 and 9 rows per step
            for i, ids in enumerate(batch):
                rid = f"{len(batch)}-{i}"
                engine.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=6, logprobs=logprobs))
                out[rid] = []
            while engine.has_unfinished():
                for o in engine.step():
                    out[o.request_id] += o.token_ids
        served[label] = out
    assert served["plain"] == served["logprobs"]
    assert len({t for toks in served["plain"].values() for t in toks}) > 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", HERE)
def test_min_tokens_keeps_the_fused_argmax_and_takes_the_samplers_token_where_it_is_a_stop_id(
    checkpoint, name, dtype, monkeypatch
):
    """Greedy rows short of their min_tokens run through the fused LM head argmax; a row whose
    argmax is one of its stop ids gets its logits from the same hidden row and the sampler's
    token. Against the same requests with full logits every step (logprobs asked), at 1 and 3
    rows a step, with the stop ids chosen to be the greedy tokens themselves."""
    model = load_model(checkpoint, dtype=dtype, kernels=name)
    prompts = [[(5 * i + 11 * j) % 4000 + 1 for j in range(4 + i)] for i in range(3)]

    def run(params_of, logprobs=None):
        engine = LLMEngine(
            EngineConfig(model_dir="unused", block_size=4, kv_cache_memory=1 << 21), model=model
        )
        out: dict[str, list[int]] = {}
        for batch in (prompts[:1], prompts):
            for i, ids in enumerate(batch):
                rid = f"{len(batch)}-{i}"
                engine.add_request(rid, ids, params_of(rid, logprobs))
                out[rid] = []
            while engine.has_unfinished():
                for o in engine.step():
                    out[o.request_id] += o.token_ids
        return out, engine

    free, _ = run(lambda rid, lp: SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=lp))

    # Every token a request picks freely is one of its stop ids, so min_tokens moves at least
    # its first token off the fused argmax (and the rest follow a new path).
    def held(rid, lp):
        return SamplingParams(
            temperature=0,
            max_tokens=6,
            min_tokens=4,
            ignore_eos=True,
            stop_token_ids=sorted(set(free[rid])),
            logprobs=lp,
        )

    sampled, _ = run(held, logprobs=1)
    recomputed = []
    real_banned = Sampler.banned_rows
    monkeypatch.setattr(
        Sampler, "banned_rows", staticmethod(lambda s, t: recomputed.append(r := real_banned(s, t)) or r)
    )
    fused, engine = run(held)
    assert fused == sampled
    assert all(fused[rid][0] != free[rid][0] and fused[rid][0] not in free[rid] for rid in free)
    # Each request's first argmax was a stop id, and that row went back for its logits.
    assert sum(len(r) for r in recomputed) >= len(free)
    assert engine.timing.steps > 0
