"""The adaptive step budget (engine/step_budget.py): the cost model, the prefill bound it gives
the scheduler, and the real engine serving a long prompt beside decoding streams."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.block_manager import KVBlockManager
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.step_budget import MIN_PREFILL_TOKENS, StepBudget, StepCostModel, parse_step_target
from engine.types import RequestMetrics, SamplingParams
from model.checkpoint import make_checkpoint
from model.loader import load_model


def test_parse_step_target() -> None:
    assert parse_step_target("auto") is None
    assert parse_step_target(" AUTO ") is None
    assert parse_step_target("off") == 0.0
    assert parse_step_target("40") == pytest.approx(0.04)
    assert parse_step_target("2.5") == pytest.approx(0.0025)
    for bad in ("", "0", "-3", "nan", "inf", "fast", "40ms"):
        with pytest.raises(ValueError, match="step target"):
            parse_step_target(bad)
    with pytest.raises(ValueError, match="step target"):
        EngineConfig(model_dir="x", step_target="soon")


def affine(a: float, b: float) -> Callable[[float], float]:
    return lambda n: a + b * n


COST = affine(0.02, 0.0005)


def auto_scheduler(max_num_seqs: int, tokens: int, blocks: int = 8192) -> tuple[Scheduler, StepBudget]:
    """A scheduler whose `auto` budget has seen steps of 1 to ``tokens`` tokens cost COST."""
    budget = StepBudget("auto", tokens)
    for n in (1, 4, 64, tokens):
        budget.observe(n, COST(n))
    bm = KVBlockManager(4, blocks, 0, None, False)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=tokens, step_budget=budget), budget


@pytest.mark.parametrize("seed", range(5))
def test_cost_model_learns_an_affine_cost_and_inverts_it(seed: int) -> None:
    rng = random.Random(seed)
    a, b = rng.uniform(1e-3, 50e-3), rng.uniform(1e-5, 1e-3)
    cost = affine(a, b)
    m = StepCostModel()
    assert m.predict(10) is None and m.max_tokens(1.0, 2048) == 2048
    for _ in range(400):  # decode-sized steps mostly, a prefill step now and then
        n = rng.randint(1, 64) if rng.random() < 0.9 else rng.randint(65, 2048)
        m.observe(n, cost(n) * rng.uniform(0.97, 1.03))
    for n in (1, 8, 64, 300, 1000, 2048):
        assert m.predict(n) == pytest.approx(cost(n), rel=0.25)
    assert all(m.predict(n) <= m.predict(n + 1) for n in range(1, 3000, 7))  # never decreasing
    for seconds in (a * 1.2, a + b * 100, a + b * 1500):
        n = m.max_tokens(seconds, 2048)
        assert 0 <= n <= 2048
        assert n == 0 or m.predict(n) <= seconds
        assert n == 2048 or m.predict(n + 1) > seconds


def test_a_run_of_decode_steps_does_not_forget_the_prefill_cost() -> None:
    m = StepCostModel()
    cost = affine(0.01, 0.001)
    m.observe(2000, cost(2000))
    for _ in range(10_000):
        m.observe(16, cost(16))
    assert m.predict(2000) == pytest.approx(cost(2000))


def test_budget_rules() -> None:
    cost = affine(0.02, 0.0005)
    for target in ("auto", "30", "off"):
        b = StepBudget(target, 2048)
        assert b.prefill_tokens(0) == 2048  # nothing decodes: full size
        assert b.prefill_tokens(10) == 2038  # nothing observed yet: the static budget
        for n in (1, 16, 64, 512, 2048):
            b.observe(n, cost(n))
        assert b.prefill_tokens(0) == 2048
        for decodes in (1, 8, 64):
            p = b.prefill_tokens(decodes)
            if target == "off":
                assert p == 2048 - decodes
                continue
            limit = 2 * cost(decodes) if target == "auto" else 0.030
            assert p >= MIN_PREFILL_TOKENS
            assert p == MIN_PREFILL_TOKENS or cost(decodes + p) <= limit * 1.01
            assert cost(decodes + p + 2) > limit * 0.99 or p == 2048 - decodes


def test_scheduler_bounds_prefill_beside_decodes_only() -> None:
    sched, budget = auto_scheduler(8, 2048, blocks=4096)
    bm, cost = sched.block_manager, COST
    p = SamplingParams(max_tokens=100, ignore_eos=True)
    first = Sequence("a", list(range(10)), p, RequestMetrics(0.0))
    sched.add(first)
    out = sched.schedule()
    assert out.num_new_tokens == [10]  # nothing decodes: the whole prompt
    first.num_computed_tokens += 10
    first.token_ids.append(1)
    long = Sequence("b", list(range(1500)), p, RequestMetrics(0.0))
    sched.add(long)
    chunks = []
    while True:
        out = sched.schedule()
        assert out.seqs[0] is first and out.num_new_tokens[0] == 1  # the decode goes first
        for s, n in zip(out.seqs, out.num_new_tokens, strict=True):
            s.num_computed_tokens += n
            bm.on_computed(s)
        first.token_ids.append(1)
        chunks += out.num_new_tokens[1:]
        if long.num_computed_tokens == 1500:
            break
    assert sum(chunks) == 1500
    bound = budget.prefill_tokens(1)
    assert len(chunks) > 1 and all(c <= bound for c in chunks)
    assert cost(1 + bound) <= 2 * cost(1) * 1.01


@pytest.fixture(scope="module")
def small_engine_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    ckpt = make_checkpoint(tmp_path_factory.mktemp("step_budget"), preset="tiny", layout="hf", seed=3)
    return ckpt, load_model(ckpt, torch.float32, "cpu")


def serve(
    ckpt: Path, model: torch.nn.Module, target: str
) -> tuple[dict[str, list[int]], list[tuple[int, int]]]:
    """Four streams decoding, then a 600-token prompt: (tokens per request, (decoding rows,
    tokens) of every step)."""
    engine = LLMEngine(
        EngineConfig(model_dir=str(ckpt), max_num_batched_tokens=1024, step_target=target,
                     kv_cache_memory=32 << 20),
        model=model,
    )  # fmt: skip
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"d{i}", [rng.randrange(1, 1000) for _ in range(8)], params)
    got: dict[str, list[int]] = {}
    steps: list[tuple[int, int]] = []
    for n in range(200):
        if n == 5:
            engine.add_request("long", [rng.randrange(1, 1000) for _ in range(600)], params)
        if not engine.has_unfinished():
            break
        decoding = sum(1 for s in engine.scheduler.running if s.num_uncomputed_tokens == 1)
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
        steps.append((decoding, engine.stats().num_batched_tokens))
    return got, steps


def test_engine_splits_a_long_prompt_beside_decodes_and_gives_the_same_tokens(
    small_engine_model: tuple[Path, torch.nn.Module],
) -> None:
    ckpt, model = small_engine_model
    off, off_steps = serve(ckpt, model, "off")
    auto, auto_steps = serve(ckpt, model, "auto")
    assert auto == off and all(len(v) == 40 for v in auto.values())  # nothing lost, same greedy tokens
    # off: the 600-token prompt goes in one step beside the decodes; auto: in several chunks
    assert len(auto_steps) > len(off_steps)


def test_auto_measures_small_steps_before_trusting_a_burst_of_big_ones() -> None:
    """After a burst of 2,048-token prefills (nothing decoded yet), the cost of decode tokens
    alone is unknown: auto takes one small step to measure it instead of letting a
    2,048-token chunk stall the first decoding streams."""
    cost = affine(0.04, 0.001)
    b = StepBudget("auto", 2048)
    for _ in range(3):
        b.observe(2048, cost(2048))
    assert b.prefill_tokens(3) == MIN_PREFILL_TOKENS  # the probe
    b.observe(3 + MIN_PREFILL_TOKENS, cost(3 + MIN_PREFILL_TOKENS))
    p = b.prefill_tokens(3)
    assert MIN_PREFILL_TOKENS < p < 2048 - 3
    assert cost(3 + p) <= 2 * cost(3 + MIN_PREFILL_TOKENS) * 1.01  # near twice the small step


def test_auto_admits_a_burst_at_full_size_while_few_streams_decode() -> None:
    """While at least RAMP_RATIO times as many sequences wait for prefill as decode, auto
    runs prefill at full size; past that it bounds the step again. An explicit target is a
    promise about every step and never ramps."""
    from engine.step_budget import RAMP_RATIO

    cost = affine(0.02, 0.0005)
    auto, fixed = StepBudget("auto", 2048), StepBudget("30", 2048)
    for b in (auto, fixed):
        for n in (1, 16, 64, 512, 2048):
            b.observe(n, cost(n))
    for decodes in (1, 7, 20):
        bounded = auto.prefill_tokens(decodes, 0)
        assert bounded < 2048 - decodes
        assert auto.prefill_tokens(decodes, RAMP_RATIO * decodes) == 2048 - decodes
        assert auto.prefill_tokens(decodes, RAMP_RATIO * decodes - 1) == bounded
        assert fixed.prefill_tokens(decodes, 100 * decodes) == fixed.prefill_tokens(decodes, 0)


def test_scheduler_admits_a_burst_at_full_size_then_bounds_it() -> None:
    """One stream decodes and four long prompts wait: they go in at full size until fewer
    than RAMP_RATIO waiting sequences per decoding one are left, then in bounded chunks."""
    from engine.step_budget import RAMP_RATIO

    sched, budget = auto_scheduler(8, 1024)
    bm = sched.block_manager
    p = SamplingParams(max_tokens=100, ignore_eos=True)
    first = Sequence("a", list(range(10)), p, RequestMetrics(0.0))
    sched.add(first)
    out = sched.schedule()
    first.num_computed_tokens += 10
    first.token_ids.append(1)
    for i in range(4):
        sched.add(Sequence(f"b{i}", list(range(900)), p, RequestMetrics(0.0)))
    while sched.waiting or any(s.num_uncomputed_tokens > 1 for s in sched.running):
        decoding = [s for s in sched.running if s.num_uncomputed_tokens == 1]
        waiting = len(sched.waiting) + sum(1 for s in sched.running if s.num_uncomputed_tokens > 1)
        out = sched.schedule()
        prefill = sum(n for n in out.num_new_tokens if n > 1)
        if waiting >= RAMP_RATIO * len(decoding):
            assert prefill == min(1024 - len(decoding), waiting * 900)  # full size
        else:
            assert prefill <= budget.prefill_tokens(len(decoding))
        for s, n in zip(out.seqs, out.num_new_tokens, strict=True):
            s.num_computed_tokens += n
            bm.on_computed(s)
            if s.num_uncomputed_tokens == 0:
                s.token_ids.append(1)


def test_a_queue_beyond_the_free_slots_does_not_ramp() -> None:
    """Two streams decode, one slot is free and ten prompts wait: only one of them can be
    admitted, so the step stays bounded (counting the whole queue would make every step a
    full-size one whenever a slot frees, stalling every stream)."""
    sched, budget = auto_scheduler(3, 1024)
    p = SamplingParams(max_tokens=100, ignore_eos=True)
    running = [Sequence(f"a{i}", list(range(10)), p, RequestMetrics(0.0)) for i in range(2)]
    for s in running:
        sched.add(s)
    sched.schedule()
    for s in running:
        s.num_computed_tokens += 10
        s.token_ids.append(1)
    for i in range(10):
        sched.add(Sequence(f"q{i}", list(range(900)), p, RequestMetrics(0.0)))
    out = sched.schedule()
    assert out.num_new_tokens[:2] == [1, 1] and len(out.num_new_tokens) == 3
    assert 0 < out.num_new_tokens[2] <= budget.prefill_tokens(2) < 900
