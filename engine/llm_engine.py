"""The synchronous engine core: requests in, one forward pass per ``step()``, outputs out."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.kv_cache import KVCache

from .block_manager import KVBlockManager
from .config import EngineConfig
from .host_memory import keep_freed_memory
from .kv_plan import plan_kv_cache
from .model_runner import ModelRunner
from .sampler import Sampler, SamplerOutput, TokenMasks
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence, SequenceStatus
from .step_budget import StepBudget
from .types import (
    EngineDeadError,
    EngineFailure,
    EngineStats,
    FailureKind,
    FinishReason,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger(__name__)

# Consecutive failed steps after which the engine declares itself dead.
MAX_CONSECUTIVE_STEP_FAILURES = 3
MAX_LOGPROBS = 20

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class StepTiming:
    """Cumulative wall time of steps and of their forward passes (for the overhead bench)."""

    steps: int = 0
    total_s: float = 0.0
    forward_s: float = 0.0
    sampler_s: float = 0.0

    @property
    def overhead_s(self) -> float:
        return self.total_s - self.forward_s


def _validate(params: SamplingParams, vocab_size: int) -> None:
    def bad(msg: str) -> InvalidRequestError:
        return InvalidRequestError(msg)

    if not params.temperature >= 0:
        raise bad(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise bad(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < -1:
        raise bad(f"top_k must be -1, 0 or positive, got {params.top_k}")
    if not 0 <= params.min_p <= 1:
        raise bad(f"min_p must be in [0, 1], got {params.min_p}")
    if params.max_tokens < 1:
        raise bad(f"max_tokens must be >= 1, got {params.max_tokens}")
    if params.min_tokens < 0:
        raise bad(f"min_tokens must be >= 0, got {params.min_tokens}")
    if not params.repetition_penalty > 0:
        raise bad(f"repetition_penalty must be > 0, got {params.repetition_penalty}")
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
        raise bad(f"logprobs must be in [0, {MAX_LOGPROBS}], got {params.logprobs}")
    for tok in params.logit_bias or {}:
        if not 0 <= int(tok) < vocab_size:
            raise bad(f"logit_bias token id {tok} is outside the vocabulary (0..{vocab_size - 1})")


class LLMEngine:
    def __init__(self, config: EngineConfig, model: torch.nn.Module | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        if self.device.type == "cpu":
            keep_freed_memory()  # before the weights load, so steps reuse pages (see host_memory)
        if model is None:
            from model.loader import load_model

            model = load_model(
                config.model_dir,
                self.dtype,
                self.device,
                dequantize_experts=config.dequantize_experts,
                kernels=config.kernels,
            )
        self.model = model
        self._model_config: ModelConfig = model.config
        mc = self._model_config
        plan = plan_kv_cache(config, mc, self.dtype, self.device)
        self._kv_plan = plan
        self.kv_cache = KVCache(
            mc, config.block_size, plan.num_full_blocks, plan.num_sliding_blocks, self.dtype, self.device
        )
        has_sliding = bool(mc.sliding_layers)
        self.block_manager = KVBlockManager(
            config.block_size,
            plan.num_full_blocks,
            plan.num_sliding_blocks,
            mc.sliding_window if has_sliding else None,
            config.enable_prefix_caching,
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            StepBudget(config.step_target, config.max_num_batched_tokens),
        )
        self.runner = ModelRunner(model, self.kv_cache, has_sliding)
        self.sampler = Sampler(mc.vocab_size, self.device, config.seed, argmax=model.kernels.argmax)
        # Constrained requests' masks are filled here while the forward pass runs (the grammar
        # library releases the GIL). Created on first use: most engines never need it.
        self._mask_worker: ThreadPoolExecutor | None = None
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (abort)
        self._alive = True
        self._consecutive_failures = 0
        self._num_steps = 0
        self._last_step_tokens = 0
        self._num_batched_tokens = 0
        self.timing = StepTiming()

    # -- properties ------------------------------------------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        return self._model_config

    @property
    def max_model_len(self) -> int:
        return self._kv_plan.max_model_len

    @property
    def weights_bytes(self) -> int:
        """Bytes of the model's weights as held (the model counts them; 0 for a model that
        does not say)."""
        count = getattr(self.model, "weights_nbytes", None)
        return int(count()) if count is not None else 0

    @property
    def kv_cache_bytes(self) -> int:
        return self._kv_plan.nbytes

    @property
    def kv_cache_tokens(self) -> int:
        return self._kv_plan.num_full_blocks * self.config.block_size

    @property
    def alive(self) -> bool:
        return self._alive

    # -- requests --------------------------------------------------------------------------
    def validate_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise the error ``add_request`` would raise, without queueing anything."""
        if not self._alive:
            raise EngineDeadError("the engine has stopped after an unrecoverable error")
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self._model_config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in 0..{vocab - 1}")
        _validate(params, vocab)
        need = len(prompt_ids) + max(1, params.min_tokens)
        if need > self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens and at least {max(1, params.min_tokens)} must be "
                f"generated, but the context holds {self.max_model_len} tokens"
            )

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None
    ) -> None:
        params = params if params is not None else SamplingParams()
        prompt_ids = [int(t) for t in prompt_ids]
        self.validate_request(request_id, prompt_ids, params)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(params.seed))
        seq = Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            metrics=RequestMetrics(arrival_time=time.monotonic()),
            generator=generator,
        )
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._pending.append(self._finish(seq, "abort"))

    def has_unfinished(self) -> bool:
        return bool(self._seqs) or bool(self._pending)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def stats(self) -> EngineStats:
        c = self.scheduler.counters
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_total=self.block_manager.num_total_blocks,
            prefix_cache_queried_tokens=c.prefix_queried_tokens,
            prefix_cache_hit_tokens=c.prefix_hit_tokens,
            num_preemptions=c.num_preemptions,
            num_steps=self._num_steps,
            last_step_tokens=self._last_step_tokens,
            num_batched_tokens=self._num_batched_tokens,
            alive=self._alive,
        )

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if not self._alive or not self.scheduler.has_unfinished():
            return outputs
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched:
            return outputs
        now = time.monotonic()
        for seq in sched.seqs:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        try:
            batch = self.runner.prepare(sched)
            pending = self._start_masks(batch.sample_seqs)
            # A batch of plain greedy rows needs only the argmax, which the LM head may fuse.
            greedy = pending is None and Sampler.plain_greedy(batch.sample_seqs)
            t_fwd = time.perf_counter()
            if greedy:
                logits, hidden = self.runner.forward_greedy(batch)
            else:
                logits = self.runner.forward(batch)
            if self.device.type == "cuda":  # so the timing split is real (the sampler syncs anyway)
                torch.cuda.synchronize(self.device)
            t_sample = time.perf_counter()
            forward_s = t_sample - t_fwd
            if greedy:
                sampled = SamplerOutput(logits.tolist(), [None] * len(batch.sample_seqs))
                # A row whose min_tokens forbids its argmax (a stop id) takes the sampler's
                # token from its logits, computed now for it alone.
                banned = Sampler.banned_rows(batch.sample_seqs, sampled.token_ids)
                if banned:
                    rows = torch.tensor(banned, device=hidden.device)
                    again = self.sampler(
                        self.runner.logits(hidden.index_select(0, rows)),
                        [batch.sample_seqs[i] for i in banned],
                    )
                    for i, token in zip(banned, again.token_ids, strict=True):
                        sampled.token_ids[i] = token
            else:
                masks = pending[0].keep(pending[1].result()) if pending else None
                sampled = self.sampler(logits, batch.sample_seqs, masks)
            sampler_s = time.perf_counter() - t_sample
        except Exception as exc:  # fail this step's requests, keep the engine
            log.exception("engine step failed")
            return outputs + self._fail_step(sched, exc)
        self._consecutive_failures = 0
        self._num_steps += 1
        self._last_step_tokens = sched.num_tokens
        self._num_batched_tokens += sched.num_tokens
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.on_computed(seq)
        now = time.monotonic()
        for seq, token, logprob in zip(batch.sample_seqs, sampled.token_ids, sampled.logprobs, strict=True):
            outputs.append(self._append_token(seq, token, logprob, now))
        self.timing.steps += 1
        self.timing.forward_s += forward_s
        self.timing.sampler_s += sampler_s
        step_s = time.perf_counter() - t0
        self.timing.total_s += step_s
        self.scheduler.step_budget.observe(sched.num_tokens, step_s)
        return outputs

    def _start_masks(self, seqs: list[Sequence]) -> tuple[TokenMasks, Future[list[int]]] | None:
        """The masks of this step's constrained rows, and their filling on the worker (the rows
        that restrict); None: no constrained row, no mask work at all."""
        masks = self.sampler.new_masks(seqs)
        if masks is None:
            return None
        if self._mask_worker is None:
            self._mask_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-masks")
        return masks, self._mask_worker.submit(self.sampler.fill_masks, seqs, masks)

    def _append_token(
        self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float
    ) -> RequestOutput:
        if seq.params.constraint is not None:
            seq.params.constraint.advance(token)
        seq.token_ids.append(token)
        seq.new_token_ids.append(token)
        if logprob is not None:
            seq.new_logprobs.append(logprob)
        m = seq.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.token_times.append(now)
        p = seq.params
        if not p.ignore_eos and token in p.stop_token_ids:
            seq.stop_token_id = token
            return self._finish(seq, "stop")
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length")
        return self._output(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id,
            token_ids=seq.new_token_ids,
            logprobs=seq.new_logprobs if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_token_id=seq.stop_token_id,
            error=seq.error,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
            metrics=seq.metrics if seq.finish_reason is not None else None,
        )
        seq.new_token_ids = []
        seq.new_logprobs = []
        return out

    def _finish(
        self, seq: Sequence, reason: FinishReason, error: EngineFailure | None = None
    ) -> RequestOutput:
        self.scheduler.remove(seq)
        self._seqs.pop(seq.request_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
        seq.metrics.finished_time = time.monotonic()
        return self._output(seq)

    def _fail_step(self, sched: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        self._consecutive_failures += 1
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        if self._consecutive_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
            return self.fail_all(
                f"{message} ({self._consecutive_failures} failed steps in a row; engine stopped)"
            )
        failure = EngineFailure(FailureKind.STEP_FAILED, message)
        return [self._finish(seq, "error", failure) for seq in sched.seqs if seq.request_id in self._seqs]

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Mark the engine dead and end every request with an error."""
        self._alive = False
        outputs, self._pending = self._pending, []
        for seq in list(self._seqs.values()):
            outputs.append(self._finish(seq, "error", EngineFailure(FailureKind.ENGINE_DEAD, message)))
        return outputs
