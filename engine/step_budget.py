"""How many tokens a step may carry while requests are decoding.

Every decoding stream waits for the whole step its next token is in, so a step that also
carries a 2,048-token prefill chunk stalls them all for its length: the inter-token tail. While
some sequence is decoding, the scheduler asks `StepBudget.prefill_tokens` how many prefill
tokens fit beside its decode tokens within a target step time; with nothing decoding, prefill
runs at the full `max_num_batched_tokens`.

The target (`EngineConfig.step_target`, `--step-target`): ``auto`` = twice the predicted time of
the step's decode tokens alone (a prefilling step then costs a decoding stream at most about
one extra step), a number of milliseconds, or ``off`` (the static budget only).

``auto`` also lets prefill run at full size while at least RAMP_RATIO times as many sequences
wait for prefill as decode: in a burst of arrivals the first few streams to decode then wait
a long step or two while the rest of the batch is admitted, instead of every prompt of the
burst going in small chunks (each of which reads all the weights again). Those long gaps are
a few streams' during the ramp only, so the inter-token tail stays bounded; the small-chunk
ramp cost 11-24% of throughput on a 64-request burst (bench/RESULTS.md).
"""

from __future__ import annotations

import bisect

# Prefill always progresses: a step with decodes still takes at least this many prefill tokens.
MIN_PREFILL_TOKENS = 32
AUTO_FACTOR = 2.0
# ``auto``: prefill at full size while waiting sequences >= RAMP_RATIO * decoding ones.
RAMP_RATIO = 2


def parse_step_target(text: str) -> float | None:
    """``"auto"`` -> None; ``"off"`` -> 0.0; ``"40"`` -> 0.04 (seconds). ValueError otherwise."""
    t = text.strip().lower()
    if t == "auto":
        return None
    if t == "off":
        return 0.0
    try:
        ms = float(t)
    except ValueError:
        raise ValueError(f"step target must be 'auto', 'off' or milliseconds > 0, not {text!r}") from None
    if not ms > 0 or ms == float("inf"):
        raise ValueError(f"step target must be 'auto', 'off' or milliseconds > 0, not {text!r}")
    return ms / 1000


class StepCostModel:
    """Seconds of a step as a function of its token count, learned from the steps run.

    One exponentially weighted mean (token count, seconds) per power-of-two bucket of token
    counts, joined piecewise linearly and made non-decreasing. Each bucket keeps its own
    history, so a long run of decode-only steps does not forget what prefill steps cost."""

    def __init__(self, weight: float = 0.25) -> None:
        self.weight = weight  # of the newest observation in its bucket
        self._buckets: dict[int, tuple[float, float]] = {}
        self._points: tuple[list[float], list[float]] = ([], [])

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or not seconds > 0:
            return
        key = tokens.bit_length()
        old = self._buckets.get(key)
        w = self.weight
        self._buckets[key] = (
            (tokens, seconds)
            if old is None
            else (old[0] + w * (tokens - old[0]), old[1] + w * (seconds - old[1]))
        )
        xs, ys, top = [], [], 0.0
        for k in sorted(self._buckets):
            n, s = self._buckets[k]
            top = max(top, s)
            xs.append(n)
            ys.append(top)
        self._points = (xs, ys)

    def smallest_observed(self) -> float | None:
        """The mean token count of the smallest bucket observed (None before any step)."""
        xs = self._points[0]
        return xs[0] if xs else None

    def predict(self, tokens: float) -> float | None:
        """Seconds of a step of ``tokens`` tokens; None before any step was observed. Below the
        smallest bucket: its time; beyond the largest: the line through the two largest (with a
        single bucket, proportional, which overestimates since it includes the fixed cost)."""
        xs, ys = self._points
        if not xs:
            return None
        if tokens <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, tokens)
        if i == len(xs):
            if len(xs) == 1:
                return ys[0] * tokens / xs[0]
            i -= 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def max_tokens(self, seconds: float, limit: int) -> int:
        """The largest token count up to ``limit`` whose predicted step fits in ``seconds``
        (``limit`` if nothing was observed yet; 0 if not even one token fits). Never more
        than twice the largest step measured: past it the line is a guess (a small model's
        first steps cost the same at 4 and at 32 tokens, which says nothing about 600)."""
        xs = self._points[0]
        if not xs:
            return limit
        limit = min(limit, int(2 * xs[-1]))
        if self.predict(limit) <= seconds:  # type: ignore[operator]
            return limit
        lo, hi = 0, limit  # predict(lo) fits (or lo == 0), predict(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.predict(mid) <= seconds:  # type: ignore[operator]
                lo = mid
            else:
                hi = mid
        return lo


class StepBudget:
    """The prefill tokens a step may take beside its decode tokens (module docstring)."""

    def __init__(self, target: str, max_num_batched_tokens: int) -> None:
        self.target_s = parse_step_target(target)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.cost = StepCostModel()

    def observe(self, tokens: int, seconds: float) -> None:
        self.cost.observe(tokens, seconds)

    def prefill_tokens(self, decode_tokens: int, waiting: int = 0) -> int:
        """Prefill tokens beside ``decode_tokens`` decoding sequences (one token each), with
        ``waiting`` sequences waiting for (the rest of) their prefill."""
        limit = self.max_num_batched_tokens - decode_tokens
        if decode_tokens == 0 or self.target_s == 0.0:
            return limit
        target = self.target_s
        if target is None:
            if waiting >= RAMP_RATIO * decode_tokens:
                return limit  # a burst being admitted (module docstring)
            smallest = self.cost.smallest_observed()
            if smallest is None:
                return limit
            if smallest > 2 * (decode_tokens + MIN_PREFILL_TOKENS):
                # Only big steps seen so far (a burst of prompts before anything decoded):
                # what decode tokens cost alone is unknown, and guessing it from a 2,048-token
                # step would let every stall through. One small step measures it.
                return min(limit, MIN_PREFILL_TOKENS)
            decode_s = self.cost.predict(decode_tokens)
            assert decode_s is not None
            target = AUTO_FACTOR * decode_s
        total = self.cost.max_tokens(target, self.max_num_batched_tokens)
        return min(limit, max(total - decode_tokens, MIN_PREFILL_TOKENS))
