"""LLMEngine end to end on a tiny random checkpoint (float32, CPU).

The reference for greedy decoding is the model itself run without any cache: the whole
sequence recomputed from scratch for every token. Block size 4 and a sliding window of 8
exercise the window logic (freeing, prefix hits) with short prompts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_doubles import FlakyModel
from scripted import install_script

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.types import (
    EngineDeadError,
    FailureKind,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)
from model.batch import BatchMetadata
from model.checkpoint import make_checkpoint
from model.kernels import available_backends
from model.loader import load_model

WINDOW = 8
BLOCK = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("engine_tiny"), preset="tiny", layout="hf", seed=1,
                           sliding_window=WINDOW)  # fmt: skip


@pytest.fixture(scope="module", params=available_backends("cpu", torch.float32))
def model(ckpt: Path, request: pytest.FixtureRequest) -> torch.nn.Module:
    """Every test below runs on each kernel backend this machine offers (model/kernels/)."""
    return load_model(ckpt, torch.float32, "cpu", kernels=request.param)


def make_engine(ckpt: Path, model: torch.nn.Module, **kw: object) -> LLMEngine:
    opts: dict = {
        "block_size": BLOCK,
        "kv_cache_memory": 1 << 20,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 32,
    }
    opts.update(kw)
    return LLMEngine(EngineConfig(model_dir=str(ckpt), **opts), model=model)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 200_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(
    engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
) -> dict[str, list[RequestOutput]]:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    outs: dict[str, list[RequestOutput]] = {rid: [] for rid in requests}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            outs[o.request_id].append(o)
    assert not engine.has_unfinished()
    assert engine.block_manager.all_free(), "every block must be back in the pool"
    return outs


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def final(outs: list[RequestOutput]) -> RequestOutput:
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    return outs[-1]


@torch.inference_mode()
def greedy_reference(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """No cache at all: recompute the whole sequence for every new token."""
    seq = list(ids)
    for _ in range(n):
        t = len(seq)
        meta = BatchMetadata(
            positions=torch.arange(t), query_start=torch.tensor([0, t]), context_lens=torch.tensor([0]),
            full_block_table=None, sliding_block_table=None, logits_indices=torch.tensor([t - 1]),
        )  # fmt: skip
        seq.append(int(model(torch.tensor(seq), meta, None).argmax(-1).item()))
    return seq[len(ids) :]


GREEDY = SamplingParams(temperature=0, max_tokens=10)
LENGTHS = [3, 9, 17, 26]  # the longer ones exceed the window and span chunks


def test_batch_invariance_and_window(ckpt: Path, model: torch.nn.Module) -> None:
    prompts = {f"r{i}": (prompt(n, i), GREEDY) for i, n in enumerate(LENGTHS)}
    together = run(make_engine(ckpt, model), prompts)
    for rid, (ids, _) in prompts.items():
        alone = run(make_engine(ckpt, model), {rid: (ids, GREEDY)})
        assert tokens(together[rid]) == tokens(alone[rid])
        last = final(together[rid])
        assert last.finish_reason == "length" and last.num_output_tokens == 10
        assert last.num_prompt_tokens == len(ids)
        m = last.metrics
        assert m is not None and len(m.token_times) == 10
        assert m.queue_time is not None and m.time_to_first_token is not None
        assert 0 <= m.queue_time <= m.time_to_first_token
    # And both equal recomputation without a cache (checks the paged, windowed attention).
    for rid in ("r0", "r3"):
        assert tokens(together[rid]) == greedy_reference(model, prompts[rid][0], 10)


def test_seeded_sampling_is_independent_of_the_batch(ckpt: Path, model: torch.nn.Module) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=8)
    ids = prompt(11, 100)
    alone = tokens(run(make_engine(ckpt, model), {"x": (ids, params)})["x"])
    crowd = {
        "a": (prompt(20, 101), SamplingParams(temperature=1.0, max_tokens=12)),
        "x": (ids, params),
        "b": (prompt(5, 102), SamplingParams(temperature=0.8, seed=7, max_tokens=4)),
        "c": (prompt(30, 103), GREEDY),
    }
    together = tokens(run(make_engine(ckpt, model, seed=5), crowd)["x"])
    assert together == alone
    other_seed = tokens(
        run(make_engine(ckpt, model), {"x": (ids, SamplingParams(temperature=1.0, seed=43, max_tokens=8))})[
            "x"
        ]
    )
    assert other_seed != alone


def test_preemption_under_a_tiny_cache_gives_the_same_tokens(ckpt: Path, model: torch.nn.Module) -> None:
    requests = {
        f"p{i}": (prompt(14 + 3 * i, 200 + i), SamplingParams(temperature=0, max_tokens=16)) for i in range(4)
    }
    roomy = run(make_engine(ckpt, model), requests)
    # Full-pool block: 2 (K,V) * 4 tokens * 2 heads * 16 dims * 4 bytes * 1 full layer = 1 KiB;
    # sliding the same. 28 KiB: 14 full blocks (56 tokens) for 4 sequences of up to 39 tokens.
    tight_engine = make_engine(ckpt, model, kv_cache_memory=28 * 1024, max_num_seqs=4)
    assert 40 <= tight_engine.max_model_len == tight_engine.kv_cache_tokens < 100
    tight = run(tight_engine, requests)
    assert tight_engine.stats().num_preemptions > 0
    for rid in requests:
        assert tokens(tight[rid]) == tokens(roomy[rid])
        assert final(tight[rid]).finish_reason == "length"


def test_prefix_cache_hit_saves_prefill_and_matches(ckpt: Path, model: torch.nn.Module) -> None:
    shared = prompt(30, 300)
    a = ([*shared, *prompt(3, 301)], GREEDY)
    b = ([*shared, *prompt(5, 302)], GREEDY)
    cold = make_engine(ckpt, model, enable_prefix_caching=False)
    run(cold, {"a": a})
    before = cold.stats().num_batched_tokens
    cold_b = run(cold, {"b": b})["b"]
    cold_cost = cold.stats().num_batched_tokens - before

    warm = make_engine(ckpt, model)
    run(warm, {"a": a})
    before = warm.stats()
    warm_b = run(warm, {"b": b})["b"]
    after = warm.stats()
    assert tokens(warm_b) == tokens(cold_b)
    hit = final(warm_b).num_cached_tokens
    assert hit == 28  # 7 whole blocks of the 30 shared tokens
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == hit
    assert after.prefix_cache_queried_tokens - before.prefix_cache_queried_tokens == len(b[0])
    assert after.num_batched_tokens - before.num_batched_tokens == cold_cost - hit
    assert final(cold_b).num_cached_tokens == 0


def test_abort_frees_everything(ckpt: Path, model: torch.nn.Module) -> None:
    engine = make_engine(ckpt, model, max_num_seqs=2)
    for i in range(4):
        engine.add_request(f"q{i}", prompt(10, 400 + i), SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    engine.step()
    assert engine.stats().num_running == 2 and engine.stats().num_waiting == 2
    assert engine.stats().kv_blocks_used > 0
    engine.abort("q0")  # running
    engine.abort("q3")  # waiting
    engine.abort("nope")  # unknown: ignored
    outs = engine.step()
    aborted = {o.request_id: o for o in outs if o.finish_reason == "abort"}
    assert set(aborted) == {"q0", "q3"} and aborted["q0"].metrics is not None
    engine.abort("q1")
    engine.abort("q2")
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.all_free() and engine.stats().kv_blocks_used == 0


def test_length_limits_and_errors(ckpt: Path, model: torch.nn.Module) -> None:
    engine = make_engine(ckpt, model, max_model_len=40, max_waiting=2)
    assert engine.max_model_len == 40
    at_limit = prompt(39, 500)
    outs = run(engine, {"edge": (at_limit, SamplingParams(temperature=0, max_tokens=100))})["edge"]
    assert tokens(outs) == greedy_reference(model, at_limit, 1)
    assert final(outs).finish_reason == "length"
    near = run(engine, {"near": (prompt(35, 501), SamplingParams(temperature=0, max_tokens=100))})["near"]
    assert len(tokens(near)) == 5 and final(near).finish_reason == "length"
    with pytest.raises(PromptTooLongError, match="40 tokens"):
        engine.add_request("over", prompt(40, 502), GREEDY)
    with pytest.raises(PromptTooLongError):
        engine.add_request("minimum", prompt(30, 503), SamplingParams(min_tokens=20))
    with pytest.raises(InvalidRequestError):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(InvalidRequestError):
        engine.add_request("vocab", [engine.model_config.vocab_size], GREEDY)
    with pytest.raises(InvalidRequestError):
        engine.add_request("temp", [1, 2], SamplingParams(temperature=-1))
    engine.add_request("w1", [1, 2], GREEDY)
    with pytest.raises(InvalidRequestError):
        engine.add_request("w1", [1, 2], GREEDY)
    engine.add_request("w2", [1, 2], GREEDY)
    with pytest.raises(QueueFullError):
        engine.add_request("w3", [1, 2], GREEDY)
    engine.abort("w1")
    engine.abort("w2")
    engine.step()
    assert engine.block_manager.all_free() and not engine.has_unfinished()


def test_stop_tokens_min_tokens_and_ignore_eos(ckpt: Path, model: torch.nn.Module) -> None:
    ids = prompt(12, 600)
    free = tokens(run(make_engine(ckpt, model), {"f": (ids, GREEDY)})["f"])
    stop = free[3]
    first = free.index(stop)
    engine = make_engine(ckpt, model)
    outs = run(engine, {"s": (ids, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop, 5]))})[
        "s"
    ]
    last = final(outs)
    assert last.finish_reason == "stop" and last.stop_token_id == stop
    assert tokens(outs) == free[: first + 1]  # the stop token is part of the output
    ignored = run(
        engine,
        {"i": (ids, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop], ignore_eos=True))},
    )
    assert tokens(ignored["i"]) == free
    # min_tokens: the stop id cannot be chosen before 5 tokens exist.
    held = tokens(
        run(
            engine,
            {
                "m": (
                    ids,
                    SamplingParams(temperature=0, max_tokens=10, min_tokens=5, stop_token_ids=[free[0]]),
                )
            },
        )["m"]
    )
    assert held[0] != free[0] and (free[0] not in held[:5])


def test_logprobs_of_scripted_tokens_are_the_models(ckpt: Path, model: torch.nn.Module) -> None:
    ids = prompt(9, 700)
    forced = [11, 22, 33]

    def source(prompt_ids: object, output_ids: object) -> int:
        return forced[len(output_ids)]  # type: ignore[arg-type]

    engine = install_script(make_engine(ckpt, model), source)
    outs = run(engine, {"t": (ids, SamplingParams(temperature=0, max_tokens=3, logprobs=2))})["t"]
    assert tokens(outs) == forced
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert [lp.token_id for lp in lps] == forced
    # The first logprob is the model's own distribution after the prompt.
    t = len(ids)
    meta = BatchMetadata(positions=torch.arange(t), query_start=torch.tensor([0, t]), context_lens=torch.tensor([0]),
                         full_block_table=None, sliding_block_table=None, logits_indices=torch.tensor([t - 1]))  # fmt: skip
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor(ids), meta, None)[0], -1)
    assert abs(lps[0].logprob - ref[11].item()) < 1e-3
    assert [tok for tok, _ in lps[0].top] == ref.topk(2).indices.tolist()


def test_step_errors_fail_requests_then_kill_the_engine(ckpt: Path, model: torch.nn.Module) -> None:
    flaky = FlakyModel(model)
    engine = make_engine(ckpt, model=flaky)
    engine.add_request("a", prompt(5, 800), GREEDY)
    flaky.failing = True
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "error")]
    failure = outs[0].error
    assert failure is not None and failure.kind is FailureKind.STEP_FAILED
    assert "simulated device failure" in failure.message
    assert engine.alive and engine.block_manager.all_free()
    flaky.failing = False
    assert final(run(engine, {"b": (prompt(5, 801), GREEDY)})["b"]).finish_reason == "length"
    flaky.failing = True
    for i in range(3):
        engine.add_request(f"c{i}", prompt(5, 802 + i), GREEDY)
        last = engine.step()
    assert [o.error.kind for o in last if o.error] == [FailureKind.ENGINE_DEAD]
    assert not engine.alive and engine.stats().alive is False
    assert engine.block_manager.all_free()
    with pytest.raises(EngineDeadError):
        engine.add_request("d", [1, 2, 3], GREEDY)


def test_random_mix_under_pressure_matches_roomy_engine(ckpt: Path, model: torch.nn.Module) -> None:
    """Shared prefixes, chunked prefills, preemption, eviction and aborts all at once: every
    request that is not aborted gives what a roomy engine without prefix caching gives."""
    rng = torch.Generator().manual_seed(7)
    prefix = prompt(13, 900)
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    for i in range(10):
        tail = prompt(int(torch.randint(1, 12, (1,), generator=rng)), 901 + i)
        ids = [*prefix[: int(torch.randint(0, 14, (1,), generator=rng))], *tail]
        seed = 50 + i if i % 3 == 0 else None
        params = SamplingParams(temperature=0.9 if seed is not None else 0, seed=seed,
                                max_tokens=int(torch.randint(3, 14, (1,), generator=rng)))  # fmt: skip
        requests[f"m{i}"] = (ids, params)
    roomy = run(make_engine(ckpt, model, enable_prefix_caching=False), requests)
    tight = make_engine(ckpt, model, kv_cache_memory=24 * 1024, max_num_seqs=5, max_num_batched_tokens=10)
    for rid, (ids, params) in requests.items():
        tight.add_request(rid, ids, params)
    got: dict[str, list[RequestOutput]] = {rid: [] for rid in requests}
    step = 0
    while tight.has_unfinished():
        step += 1
        if step == 6:
            tight.abort("m4")
        for o in tight.step():
            got[o.request_id].append(o)
    assert tight.block_manager.all_free()
    stats = tight.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    for rid in requests:
        if rid == "m4" and final(got[rid]).finish_reason == "abort":
            continue
        assert tokens(got[rid]) == tokens(roomy[rid]), rid


def test_bfloat16_engine_serves_a_mixed_batch(ckpt: Path) -> None:
    """The CPU production setting (bf16, oneDNN-prepacked weights where available): prefill
    chunks and batched decodes of several requests at once, across the window. Every request
    completes with its token count and every block comes back; the tokens stay close to the
    bf16 model recomputed without a cache (exact equality is a float32 property: in bf16,
    near-tied random logits may round either way between the two attention paths)."""
    bf16 = load_model(ckpt, torch.bfloat16, "cpu", dequantize_experts=True)
    prompts = {f"b{i}": (prompt(n, 50 + i), GREEDY) for i, n in enumerate(LENGTHS)}
    outs = run(make_engine(ckpt, bf16, dtype="bfloat16"), prompts)
    agree = total = 0
    for rid, (ids, _) in prompts.items():
        last = final(outs[rid])
        assert last.finish_reason == "length" and last.num_output_tokens == 10
        got = tokens(outs[rid])
        assert all(0 <= t < bf16.config.vocab_size for t in got)
        ref = greedy_reference(bf16, ids, 10)
        agree += sum(a == b for a, b in zip(got, ref, strict=True))
        total += len(ref)
    assert agree >= 0.5 * total, f"{agree}/{total} tokens agree with recomputation"
