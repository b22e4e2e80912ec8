"""The engine's public data: what a request asks for and what it gets back.

The HTTP layer builds ``SamplingParams`` and reads ``RequestOutput``; nothing here knows
about HTTP or Harmony (stop ids are plain token ids chosen by the caller).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "abort", "error"]


class TokenConstraint(Protocol):
    """Which tokens one request may sample next (structured outputs, reasoning budgets).

    Built by the caller, one per request (it holds that request's state). Each step the engine
    calls ``fill_mask`` for the token about to be sampled, on a worker thread while the forward
    pass runs, then ``advance`` with the token sampled. Neither may raise: a constraint that
    cannot go on allows only the request's stop tokens."""

    def fill_mask(self, row: torch.Tensor) -> bool:
        """Write the allowed tokens into ``row`` (int32, zeroed, bit ``t % 32`` of word
        ``t // 32`` = token t allowed); False = no restriction this step (``row`` untouched)."""
        ...

    def advance(self, token_id: int) -> None: ...


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # None = off; k >= 0 = sampled token's logprob + k alternatives
    ignore_eos: bool = False  # never stop on stop_token_ids (benchmarks)
    constraint: TokenConstraint | None = None  # this request's own (never shared between requests)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first


@dataclass
class RequestMetrics:
    arrival_time: float  # time.monotonic() seconds
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per generated token

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """One increment of a request's output, streamed as soon as it exists."""

    request_id: str
    token_ids: list[int]  # tokens generated since the previous output
    logprobs: list[TokenLogprob] | None = None  # parallel to token_ids when asked
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None  # which stop id ended it (finish_reason == "stop")
    error: EngineFailure | None = None  # why it ended, with finish_reason "error" (or "abort" by the engine)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_output_tokens: int = 0  # generated so far, cumulative
    metrics: RequestMetrics | None = None  # filled on the final output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class FailureKind(enum.Enum):
    """Why the engine refused or ended a request (the server maps each to one HTTP answer)."""

    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID = "invalid"
    QUEUE_FULL = "queue_full"
    ENGINE_DEAD = "engine_dead"
    STEP_FAILED = "step_failed"  # a forward pass or the sampler raised: a real fault
    SHUTDOWN = "shutdown"  # the engine is stopping


@dataclass(frozen=True)
class EngineFailure:
    kind: FailureKind
    message: str


class EngineError(Exception):
    """Base of the errors ``add_request`` raises before anything is queued."""

    kind: FailureKind = FailureKind.INVALID

    @property
    def failure(self) -> EngineFailure:
        return EngineFailure(self.kind, str(self))


class PromptTooLongError(EngineError):
    """The prompt (plus min_tokens) cannot fit the context window or the whole KV cache."""

    kind = FailureKind.PROMPT_TOO_LONG


class InvalidRequestError(EngineError, ValueError):
    """The request itself is malformed (empty prompt, token id outside the vocabulary,
    duplicate request id, parameters out of range)."""

    kind = FailureKind.INVALID


class QueueFullError(EngineError):
    """The waiting queue is at its bound: answer 429 and let the client retry."""

    kind = FailureKind.QUEUE_FULL


class EngineDeadError(EngineError):
    """The engine loop died and cannot take requests."""

    kind = FailureKind.ENGINE_DEAD


@dataclass
class EngineStats:
    """A snapshot of the engine for metrics and health; cheap to take."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0  # blocks held by live requests (both pools)
    kv_blocks_total: int = 0
    prefix_cache_queried_tokens: int = 0  # cumulative prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0  # cumulative prompt tokens served from it
    num_preemptions: int = 0  # cumulative
    num_steps: int = 0  # cumulative
    last_step_tokens: int = 0  # tokens in the latest forward pass
    num_batched_tokens: int = 0  # cumulative tokens computed by forward passes (prefill + decode)
    alive: bool = True

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class EngineClient(Protocol):
    """What the server needs of an engine (``engine.async_engine.AsyncEngine``; test fakes).

    ``add_request`` raises an ``EngineError`` before queueing anything; afterwards every
    outcome arrives on the iterator, the last output with a finish reason (and, for
    "error", an ``EngineFailure``). ``abort`` is idempotent and frees everything at once."""

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def weights_bytes(self) -> int: ...

    @property
    def kv_cache_bytes(self) -> int: ...

    @property
    def kv_cache_tokens(self) -> int: ...
