"""Batched sampling on the logits' device, with per-request parameters.

All per-token work is tensor ops over the whole batch (or over the subset of rows that use
a feature, so a batch of plain greedy requests pays for one argmax). Python touches each
request only to read its parameters, and, for requests with their own seed, to draw one
uniform number from that request's generator: sampling is inverse-CDF with one uniform per
row, so a seeded request's draw depends only on its own generator and logits, never on
its batch neighbours.

Order: penalties (presence/frequency on generated tokens, repetition on prompt+generated),
logit_bias, min_tokens (stop ids suppressed), a constrained request's token mask (disallowed
tokens to -inf; rows whose constraint allows everything this step are left alone), then
greedy rows take the argmax; sampled
rows apply temperature, top_k, top_p, min_p and draw. Logprobs are those of the model's own
distribution (log_softmax of the raw logits), like vLLM's default and OpenAI's API.

Logits arrive in the model dtype. The argmax runs on them as they are (upcasting is exact and
keeps the order); every other computation upcasts just the rows it touches to float32, so a
batch of greedy requests never pays for an fp32 copy of the whole [N, vocab] tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.kernels.reference import greedy_argmax

from .sequence import Sequence
from .types import TokenLogprob

GREEDY_EPS = 1e-5  # temperatures below this are greedy (dividing by them overflows)
TOP_P_CANDIDATES = 1024  # nucleus searched among this many top tokens before a full sort


@dataclass
class TokenMasks:
    """Bitmasks of the rows whose constraint restricts this step: ``bits[j]`` is row ``rows[j]``'s."""

    rows: list[int]
    bits: torch.Tensor  # int32 [len(rows), ceil(V / 32)], on the CPU

    def keep(self, kept: list[int]) -> TokenMasks | None:
        """Only the rows (indices into ``rows``) whose constraint restricted this step."""
        if not kept:
            return None
        if len(kept) == len(self.rows):
            return self
        return TokenMasks([self.rows[j] for j in kept], self.bits[kept])


def _held(seq: Sequence) -> bool:
    """Still short of its min_tokens: its stop ids may not be sampled this step."""
    return seq.num_output_tokens < seq.params.min_tokens


def unpack_bits(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [R, W] bitmasks -> bool [R, vocab_size] (bit t % 32 of word t // 32 = token t)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(bits.shape[0], -1)[:, :vocab_size]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


class Sampler:
    def __init__(
        self,
        vocab_size: int,
        device: torch.device,
        seed: int,
        argmax: Callable[[torch.Tensor], torch.Tensor] = greedy_argmax,
    ) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.argmax = argmax  # the model's kernels' argmax (torch.argmax's result, faster)
        # Draws for requests without a seed of their own: reproducible per engine run.
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def new_masks(self, seqs: list[Sequence]) -> TokenMasks | None:
        """Zeroed bitmasks for this step's constrained rows, None without any. On the engine
        thread: the mask worker runs no torch op of its own (see ``fill_masks``)."""
        rows = [i for i, s in enumerate(seqs) if s.params.constraint is not None]
        if not rows:
            return None
        return TokenMasks(rows, torch.zeros(len(rows), (self.vocab_size + 31) // 32, dtype=torch.int32))

    @staticmethod
    def fill_masks(seqs: list[Sequence], masks: TokenMasks) -> list[int]:
        """Ask each constrained sequence for its mask, on the engine's mask worker; -> the
        indices into ``masks.rows`` of those that restrict this step (``TokenMasks.keep``).
        Nothing here runs a torch kernel that could go parallel (the grammar library writes
        through a pointer; the rest are scalar writes): the worker's own OpenMP pool would
        stop GNU OpenMP's spin-wait for the engine thread (engine/async_engine.py)."""
        return [j for j, i in enumerate(masks.rows) if seqs[i].params.constraint.fill_mask(masks.bits[j])]  # type: ignore[union-attr]

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], masks: TokenMasks | None = None
    ) -> SamplerOutput:
        """logits [N, V] (float32 or the model dtype), one row per sequence in ``seqs``."""
        n = len(seqs)
        if n == 0:
            return SamplerOutput([], [])
        x = self._process(logits, seqs, masks)
        random_rows = [i for i, s in enumerate(seqs) if s.params.temperature >= GREEDY_EPS]
        tokens = self.argmax(x) if len(random_rows) < n else torch.empty(n, dtype=torch.long, device=x.device)
        if random_rows:
            idx = torch.tensor(random_rows, device=x.device)
            tokens[idx] = self._sample(x.index_select(0, idx), [seqs[i] for i in random_rows])
        return SamplerOutput(tokens.tolist(), self.logprobs_of(logits, seqs, tokens))

    @staticmethod
    def plain_greedy(seqs: list[Sequence]) -> bool:
        """True when every row's token is the argmax of its raw logits, or (a row still short
        of its min_tokens) that argmax unless it is one of the row's stop ids, and nothing else
        is read from them: greedy, no logprobs, penalties, logit_bias or constraint (see
        ``_process``). The model can then fuse the argmax into its LM head; the rows that
        ``banned_rows`` names go through the sampler on their logits."""
        for s in seqs:
            p = s.params
            if (
                p.temperature >= GREEDY_EPS
                or p.logprobs is not None
                or p.presence_penalty
                or p.frequency_penalty
                or p.repetition_penalty != 1.0
                or p.logit_bias
                or p.constraint is not None
            ):
                return False
        return True

    @staticmethod
    def banned_rows(seqs: list[Sequence], tokens: list[int]) -> list[int]:
        """The rows of a ``plain_greedy`` batch whose argmax ``tokens`` their min_tokens
        forbids (one of their stop ids). Elsewhere the argmax is the sampler's token too:
        suppressing other ids to -inf leaves the maximum and its first index where they are."""
        return [
            i
            for i, (s, t) in enumerate(zip(seqs, tokens, strict=True))
            if _held(s) and t in s.params.stop_token_ids
        ]

    # -- logits processing ------------------------------------------------------------------
    def _process(
        self, logits: torch.Tensor, seqs: list[Sequence], masks: TokenMasks | None = None
    ) -> torch.Tensor:
        params = [s.params for s in seqs]
        pen_rows = [
            i for i, p in enumerate(params)
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
        ]  # fmt: skip
        bias_rows, bias_cols, bias_vals = [], [], []
        for i, p in enumerate(params):
            if p.logit_bias:
                for tok, val in p.logit_bias.items():
                    bias_rows.append(i)
                    bias_cols.append(int(tok))
                    bias_vals.append(float(val))
        ban_rows, ban_cols = [], []
        for i, (s, p) in enumerate(zip(seqs, params, strict=True)):
            if _held(s):
                for tok in p.stop_token_ids:
                    if 0 <= tok < self.vocab_size:
                        ban_rows.append(i)
                        ban_cols.append(tok)
        if not (pen_rows or bias_rows or ban_rows or masks):
            return logits
        x = (
            logits.float() if logits.dtype != torch.float32 else logits.clone()
        )  # raw logits stay for logprobs
        dev = x.device
        if pen_rows:
            x[torch.tensor(pen_rows, device=dev)] = self._penalize(
                x[torch.tensor(pen_rows, device=dev)], [seqs[i] for i in pen_rows]
            )
        if bias_rows:
            x.index_put_(
                (torch.tensor(bias_rows, device=dev), torch.tensor(bias_cols, device=dev)),
                torch.tensor(bias_vals, dtype=x.dtype, device=dev),
                accumulate=True,
            )
        if ban_rows:
            x[torch.tensor(ban_rows, device=dev), torch.tensor(ban_cols, device=dev)] = float("-inf")
        if masks:
            idx = torch.tensor(masks.rows, device=dev)
            allowed = unpack_bits(masks.bits.to(dev), self.vocab_size)
            x[idx] = x.index_select(0, idx).masked_fill(~allowed, float("-inf"))
        return x

    def _penalize(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """OpenAI presence/frequency penalties on generated tokens; the CTRL/HF repetition
        penalty (divide positive logits, multiply negative ones) on prompt and generated."""
        dev, v = x.device, self.vocab_size
        params = [s.params for s in seqs]
        pres = torch.tensor([p.presence_penalty for p in params], dtype=x.dtype, device=dev)[:, None]
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=x.dtype, device=dev)[:, None]
        rep = torch.tensor([p.repetition_penalty for p in params], dtype=x.dtype, device=dev)[:, None]
        # One padding column past the vocabulary soaks up the padding ids.
        out_ids = _pad([s.output_ids for s in seqs], v, dev)
        counts = torch.zeros(len(seqs), v + 1, dtype=x.dtype, device=dev)
        if out_ids.numel():
            counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=x.dtype))
        counts = counts[:, :v]
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.zeros(len(seqs), v + 1, dtype=torch.bool, device=dev)
            seen.scatter_(1, _pad([s.token_ids for s in seqs], v, dev), True)
            seen = seen[:, :v]
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        return x - freq * counts - pres * (counts > 0).to(x.dtype)

    # -- drawing -----------------------------------------------------------------------------
    def _sample(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """x [R, V] processed logits of rows that sample -> token ids [R]."""
        dev = x.device
        params = [s.params for s in seqs]
        r, v = x.shape
        x = x.float()  # raw model-dtype rows when nothing processed them
        x = x / torch.tensor([p.temperature for p in params], dtype=x.dtype, device=dev)[:, None]
        top_k = [p.top_k if 0 < p.top_k < v else v for p in params]
        if min(top_k) < v:
            kmax = max(k for k in top_k if k < v)
            kth = x.topk(kmax, dim=-1).values  # [R, kmax], best first
            idx = torch.tensor([min(k, kmax) - 1 for k in top_k], device=dev)[:, None]
            threshold = kth.gather(1, idx)
            threshold[torch.tensor([k >= v for k in top_k], device=dev)] = float("-inf")
            x = x.masked_fill(x < threshold, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if p_rows:
            idx = torch.tensor(p_rows, device=dev)
            top_p = torch.tensor([params[i].top_p for i in p_rows], dtype=probs.dtype, device=dev)[:, None]
            probs[idx] = self._top_p(probs.index_select(0, idx), top_p)
        min_p = [p.min_p for p in params]
        if any(m > 0 for m in min_p):
            m = torch.tensor(min_p, dtype=probs.dtype, device=dev)[:, None]
            probs = probs.masked_fill(probs < m * probs.amax(dim=-1, keepdim=True), 0.0)
        # Inverse CDF, one uniform per row. Seeded rows draw from their own generator.
        u = torch.rand(r, generator=self.generator, device=dev, dtype=torch.float64)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                u[i] = torch.rand((), generator=s.generator, device=dev, dtype=torch.float64)
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:]
        # Strictly below the total, so the first cdf entry above it has positive mass.
        target = torch.minimum(
            (u[:, None] * total.double()).to(cdf.dtype), torch.nextafter(total, torch.zeros_like(total))
        )
        return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=v - 1)

    def _top_p(self, probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Zero every token outside the smallest set, taken best first, whose mass reaches
        top_p. Looks among the top TOP_P_CANDIDATES first; rows whose nucleus is wider (flat
        distributions) fall back to a full sort."""
        v = probs.shape[-1]
        k = min(TOP_P_CANDIDATES, v)
        vals, idx = probs.topk(k, dim=-1)
        if k < v:
            fits = vals.sum(dim=-1, keepdim=True) >= top_p * probs.sum(dim=-1, keepdim=True)
            if not bool(fits.all()):
                vals, idx = probs.sort(dim=-1, descending=True)
        mass_before = vals.cumsum(dim=-1) - vals
        total = probs.sum(dim=-1, keepdim=True)
        keep_sorted = mass_before < top_p * total  # the best token always stays
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, keep_sorted)
        return probs.masked_fill(~keep, 0.0)

    # -- logprobs ----------------------------------------------------------------------------
    def logprobs_of(
        self, logits: torch.Tensor, seqs: list[Sequence], tokens: torch.Tensor
    ) -> list[TokenLogprob | None]:
        """The model's logprobs of ``tokens`` (one per row) for the rows that asked for them."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(seqs)
        if not rows:
            return out
        idx = torch.tensor(rows, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
        chosen = lp.gather(1, tokens.index_select(0, idx)[:, None]).squeeze(1).tolist()
        kmax = max(seqs[i].params.logprobs or 0 for i in rows)
        top_vals, top_ids = lp.topk(kmax, dim=-1) if kmax else (None, None)
        tv = top_vals.tolist() if top_vals is not None else None
        ti = top_ids.tolist() if top_ids is not None else None
        chosen_ids = tokens.index_select(0, idx).tolist()
        for j, i in enumerate(rows):
            k = seqs[i].params.logprobs or 0
            top = (
                list(zip(ti[j][:k], tv[j][:k], strict=True))
                if k and ti is not None and tv is not None
                else []
            )
            out[i] = TokenLogprob(token_id=chosen_ids[j], logprob=chosen[j], top=top)
        return out
