"""AsyncEngine: the engine loop in its own thread, streams on the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch
from engine_doubles import FlakyModel

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.types import (
    EngineDeadError,
    FailureKind,
    PromptTooLongError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)
from model.checkpoint import make_checkpoint
from model.loader import load_model
from model.safetensors_reader import CheckpointError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("async_tiny"), preset="tiny", layout="hf", seed=2, sliding_window=8
    )


@pytest.fixture(scope="module")
def model(ckpt: Path) -> torch.nn.Module:
    return load_model(ckpt, torch.float32, "cpu")


def config(ckpt: Path, **kw: object) -> EngineConfig:
    opts: dict = {
        "block_size": 4,
        "kv_cache_memory": 1 << 20,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 32,
    }
    opts.update(kw)
    return EngineConfig(model_dir=str(ckpt), **opts)


async def collect(stream: object) -> list[RequestOutput]:
    return [o async for o in stream]  # type: ignore[attr-defined]


def prompts() -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(9)
    return {f"r{i}": torch.randint(0, 200_000, (n,), generator=g).tolist() for i, n in enumerate((4, 13, 21))}


def test_streams_match_the_sync_engine(ckpt: Path, model: torch.nn.Module) -> None:
    params = SamplingParams(temperature=0, max_tokens=6)
    sync = LLMEngine(config(ckpt), model=model)
    for rid, ids in prompts().items():
        sync.add_request(rid, ids, params)
    expected: dict[str, list[int]] = {rid: [] for rid in prompts()}
    while sync.has_unfinished():
        for o in sync.step():
            expected[o.request_id].extend(o.token_ids)

    engine = AsyncEngine(LLMEngine(config(ckpt), model=model))
    engine.start()
    try:
        assert engine.is_alive and engine.max_model_len > 0 and engine.kv_cache_tokens > 0
        loop_thread = threading.get_ident()

        async def main() -> dict[str, list[RequestOutput]]:
            streams = {rid: engine.add_request(rid, ids, params) for rid, ids in prompts().items()}
            results = await asyncio.gather(*(collect(s) for s in streams.values()))
            assert threading.get_ident() == loop_thread
            return dict(zip(streams, results, strict=True))

        got = asyncio.run(main())
        for rid, outs in got.items():
            assert [t for o in outs for t in o.token_ids] == expected[rid]
            assert outs[-1].finish_reason == "length" and outs[-1].metrics is not None
        # Idle: the loop sleeps on its condition (no busy wait) and the pool is full.
        time.sleep(0.05)
        cpu = time.process_time()
        time.sleep(0.3)
        assert time.process_time() - cpu < 0.05
        assert engine.engine.block_manager.all_free()
        assert engine.stats().num_running == 0 and engine.num_waiting == 0
    finally:
        engine.shutdown()
    assert not engine.is_alive


def test_one_wake_up_of_the_event_loop_per_step(ckpt: Path, model: torch.nn.Module) -> None:
    """A step's outputs for many streams reach the loop in one call_soon_threadsafe, not one
    per token (each call wakes the loop through its self-pipe)."""
    engine = AsyncEngine(LLMEngine(config(ckpt), model=model))
    engine.start()
    try:
        wakeups = 0

        async def main() -> list[list[RequestOutput]]:
            nonlocal wakeups
            loop = asyncio.get_running_loop()
            plain = loop.call_soon_threadsafe

            def counting(*args: object, **kw: object) -> object:
                nonlocal wakeups
                if threading.current_thread().name == "engine-loop":
                    wakeups += 1
                return plain(*args, **kw)  # type: ignore[arg-type]

            loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
            params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
            streams = [engine.add_request(f"w{i}", [5 + i, 6, 7], params) for i in range(6)]
            return await asyncio.gather(*(collect(s) for s in streams))

        results = asyncio.run(main())
        assert all(sum(len(o.token_ids) for o in outs) == 10 for outs in results)
        steps = engine.engine.timing.steps
        assert 10 <= steps <= 20 and wakeups <= steps + 1  # 60 tokens, at most one wake-up per step
    finally:
        engine.shutdown()


def test_abort_errors_and_disconnect(ckpt: Path, model: torch.nn.Module) -> None:
    engine = AsyncEngine(LLMEngine(config(ckpt, max_model_len=300, max_num_seqs=1), model=model))
    engine.start()
    try:

        async def main() -> None:
            long = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
            stream = engine.add_request("a", [1, 2, 3], long)
            first = await stream.__anext__()
            assert first.token_ids and not first.finished
            engine.abort("a")
            rest = await collect(stream)
            assert rest[-1].finish_reason == "abort"
            with pytest.raises(PromptTooLongError):
                engine.add_request("b", list(range(300)), long)
            # A consumer that walks away aborts its request (frees its blocks).
            stream = engine.add_request("c", [4, 5, 6], long)
            await stream.__anext__()
            await stream.aclose()
            for _ in range(200):
                if engine.engine.block_manager.all_free() and not engine.engine.has_unfinished():
                    break
                await asyncio.sleep(0.01)
            assert engine.engine.block_manager.all_free()
            # One that stops at the last output has had everything: no abort (nor its lock).
            aborted: list[str] = []
            plain_abort = engine.abort
            engine.abort = lambda rid: (aborted.append(rid), plain_abort(rid))  # type: ignore[method-assign]
            stream = engine.add_request("d", [4, 5, 6], SamplingParams(temperature=0, max_tokens=3))
            async for out in stream:
                if out.finished:
                    break
            await stream.aclose()
            stream = engine.add_request("e", [4, 5, 6], long)
            await stream.__anext__()
            await stream.aclose()
            assert aborted == ["e"]

        asyncio.run(main())
    finally:
        engine.shutdown()
    with pytest.raises(EngineDeadError):
        asyncio.run(_add(engine))


async def _add(engine: AsyncEngine) -> None:
    engine.add_request("z", [1], SamplingParams())


def test_queue_bound(ckpt: Path, model: torch.nn.Module) -> None:
    engine = AsyncEngine(LLMEngine(config(ckpt, max_waiting=1, max_num_seqs=1), model=model))
    engine.start()
    try:

        async def main() -> None:
            p = SamplingParams(temperature=0, max_tokens=3)
            s1 = engine.add_request("a", [1, 2], p)
            # "a" sits in the inbox or the queue until the thread admits it; one more may wait.
            with pytest.raises(QueueFullError):
                for i in range(50):
                    engine.add_request(f"q{i}", [1, 2], p)
            assert engine.max_waiting == 1
            await collect(s1)

        asyncio.run(main())
    finally:
        engine.shutdown()


def test_a_failing_step_ends_streams_with_an_error(ckpt: Path, model: torch.nn.Module) -> None:
    flaky = FlakyModel(model, message="simulated failure")
    engine = AsyncEngine(LLMEngine(config(ckpt), model=flaky))
    engine.start()
    try:

        async def main() -> None:
            flaky.failing = True
            outs = await collect(
                engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4))
            )
            failure = outs[-1].error
            assert outs[-1].finish_reason == "error" and failure is not None
            assert failure.kind is FailureKind.STEP_FAILED and "simulated failure" in failure.message
            assert engine.is_alive
            flaky.failing = False
            outs = await collect(
                engine.add_request("b", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4))
            )
            assert outs[-1].finish_reason == "length"

        asyncio.run(main())
    finally:
        engine.shutdown()


def test_the_model_loads_on_the_engine_thread(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start() loads the model on the engine thread, the only thread then to run torch's
    parallel regions (GNU OpenMP stops spin-waiting once the idle pools of other threads
    outnumber the CPUs); a load that fails raises from start() on the caller."""
    import engine.async_engine as async_engine

    loaded_on: list[str] = []

    class Recorded(LLMEngine):
        def __init__(self, cfg: EngineConfig) -> None:
            loaded_on.append(threading.current_thread().name)
            super().__init__(cfg)

    monkeypatch.setattr(async_engine, "LLMEngine", Recorded)
    engine = AsyncEngine(config(ckpt, dtype="float32"))
    engine.start()
    try:
        assert loaded_on == ["engine-loop"] and engine.is_alive

        async def main() -> list[RequestOutput]:
            return await collect(
                engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
            )

        assert asyncio.run(main())[-1].finish_reason == "length"
    finally:
        engine.shutdown()

    broken = AsyncEngine(config(ckpt.parent / "missing"))
    for _ in range(2):  # and again: a failed start leaves nothing half-started
        with pytest.raises(CheckpointError, match="missing"):
            broken.start()
        assert not broken.is_alive
