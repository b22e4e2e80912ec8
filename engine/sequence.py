"""One request's state inside the engine: its tokens, how many are in the KV cache, its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .types import EngineFailure, FinishReason, RequestMetrics, SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    # Prompt followed by every generated token. After a preemption everything here is
    # recomputed as if it were prompt, so the next token continues the same stream.
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    full_blocks: list[int] = field(default_factory=list)  # full-attention pool, logical order
    sliding_blocks: list[int] = field(default_factory=list)  # sliding pool, -1 = outside the window
    # Chain hashes of this sequence's full blocks (block i covers tokens [i*bs, (i+1)*bs)).
    # They depend only on tokens, so they survive preemption.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks already published to the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    generator: torch.Generator | None = None  # per-request seeded sampling
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted_once: bool = False
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    error: EngineFailure | None = None
    # Produced since the last RequestOutput.
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
