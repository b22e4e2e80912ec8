"""The batched sampler on hand-made logits (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import Sampler
from engine.sequence import Sequence
from engine.types import RequestMetrics, SamplingParams
from model.kernels.reference import ARGMAX_CHUNK, greedy_argmax

V = 12


def seq(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None) -> Sequence:
    s = Sequence(request_id="r", prompt_ids=prompt or [0], params=params, metrics=RequestMetrics(0.0))
    s.token_ids.extend(output or [])
    if params.seed is not None:
        s.generator = torch.Generator().manual_seed(params.seed)
    return s


def sampler() -> Sampler:
    return Sampler(V, torch.device("cpu"), seed=0)


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_degenerate_filters_pick_argmax() -> None:
    x = logits_rows(4)
    seqs = [
        seq(SamplingParams(temperature=0)),
        seq(SamplingParams(temperature=1.0, top_k=1)),
        seq(SamplingParams(temperature=1.0, top_p=1e-6)),
        seq(SamplingParams(temperature=0.7, min_p=1.0)),
    ]
    out = sampler()(x, seqs)
    assert out.token_ids == x.argmax(-1).tolist()
    assert out.logprobs == [None] * 4


def test_logit_bias_min_tokens_and_penalties() -> None:
    x = torch.zeros(4, V)
    x[:, 3] = 5.0
    x[:, 4] = 4.0
    seqs = [
        seq(SamplingParams(temperature=0, logit_bias={7: 100.0})),
        seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3]), output=[1]),  # 3 banned
        seq(SamplingParams(temperature=0, frequency_penalty=0.6), output=[3, 3]),  # 5 - 1.2 < 4
        seq(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[3]),  # 5 / 2 < 4
    ]
    assert sampler()(x, seqs).token_ids == [7, 4, 4, 4]
    # Presence counts once; repetition on a negative logit multiplies.
    y = torch.zeros(2, V)
    y[:, 3] = 1.0
    y[:, 5] = -1.0
    y[:, 6] = -1.5
    s = [
        seq(SamplingParams(temperature=0, presence_penalty=0.5), output=[3, 3, 3]),
        seq(SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={6: 1.0, 3: -5.0}), prompt=[5]),
    ]
    processed = sampler()._process(y, s)
    assert processed[0, 3].item() == 0.5
    assert (
        processed[1, 5].item() == -2.0 and processed[1, 6].item() == -0.5 and processed[1, 3].item() == -4.0
    )


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    x = logits_rows(5, seed=1)
    params = SamplingParams(temperature=1.3, top_p=0.9, top_k=8, seed=1234)
    g = seq(params)
    alone = []
    for _ in range(20):
        alone.append(sampler()(x[2:3], [g]).token_ids[0])
    g2 = seq(params)
    batched = []
    for step in range(20):
        others = [seq(SamplingParams(temperature=1.0, seed=step)), seq(SamplingParams(temperature=0.5))]
        rows = torch.cat([x[0:1], x[2:3], x[4:5]])
        batched.append(sampler()(rows, [others[0], g2, others[1]]).token_ids[1])
    assert alone == batched
    assert len(set(alone)) > 1  # it really samples


def test_sampling_follows_the_distribution() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-1e9] * (V - 4)])
    n = 4000
    s = sampler()
    rows = logits.expand(n, V).contiguous()
    tokens = s(rows, [seq(SamplingParams(temperature=1.0)) for _ in range(n)]).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=V).float()
    expected = torch.softmax(logits[0], -1) * n
    assert counts[4:].sum() == 0
    chi2 = (((counts[:4] - expected[:4]) ** 2) / expected[:4]).sum().item()
    assert chi2 < 20  # 3 degrees of freedom: p < 0.0002 under the null
    # top_p 0.7 keeps tokens 0 and 1 (0.64 of mass before token 1 < 0.7), drops 2 and 3.
    tokens = s(rows, [seq(SamplingParams(temperature=1.0, top_p=0.7)) for _ in range(n)]).token_ids
    assert set(tokens) == {0, 1}
    # top_k 3 with temperature 2: tokens 0..2 only, flatter.
    tokens = s(rows, [seq(SamplingParams(temperature=2.0, top_k=3)) for _ in range(n)]).token_ids
    assert set(tokens) == {0, 1, 2}


def test_logprobs_are_the_models_distribution() -> None:
    x = logits_rows(2, seed=3)
    seqs = [seq(SamplingParams(temperature=0, logprobs=3)), seq(SamplingParams(temperature=0, logprobs=0))]
    out = sampler()(x, seqs)
    ref = torch.log_softmax(x, -1)
    lp0 = out.logprobs[0]
    assert lp0 is not None and lp0.token_id == out.token_ids[0]
    assert math.isclose(lp0.logprob, ref[0].max().item(), rel_tol=1e-5)
    top_ids = ref[0].topk(3).indices.tolist()
    assert [t for t, _ in lp0.top] == top_ids
    assert all(math.isclose(v, ref[0, t].item(), rel_tol=1e-5) for t, v in lp0.top)
    lp1 = out.logprobs[1]
    assert lp1 is not None and lp1.top == []


def test_logprobs_of_given_tokens_are_the_models() -> None:
    x = logits_rows(1, seed=4)
    out = sampler().logprobs_of(x, [seq(SamplingParams(temperature=0, logprobs=1))], torch.tensor([5]))
    lp = out[0]
    assert lp is not None and lp.token_id == 5
    assert lp is not None and math.isclose(lp.logprob, torch.log_softmax(x, -1)[0, 5].item(), rel_tol=1e-5)


@pytest.mark.parametrize("vocab", [1, 7, ARGMAX_CHUNK, ARGMAX_CHUNK + 1, 3 * ARGMAX_CHUNK, 201088])
def test_greedy_argmax_is_torch_argmax(vocab: int) -> None:
    """The rule: the first index of each row's maximum, NaN counting as the maximum, for any
    vocabulary size and any placement of ties (within a chunk, across chunks, in the short
    last chunk), for float32 and bfloat16 logits; also where bit patterns do not order as
    values (negative NaNs, rows with no positive value, +0 tied with -0, infinities)."""
    g = torch.Generator().manual_seed(vocab)
    negative_nan = torch.zeros(()) * float("inf")  # what x86 makes: sign bit set
    assert negative_nan.view(torch.int32) < 0
    for trial in range(40):
        rows = 1 + trial % 5
        x = torch.randn(rows, vocab, generator=g)
        kind = trial % 8
        if kind == 1:  # few distinct values: ties everywhere
            x = torch.randint(0, 3, (rows, vocab), generator=g).float()
        if kind == 2 and vocab > 1:  # the maximum repeated at random places
            for r in range(rows):
                idx = torch.randint(0, vocab, (3,), generator=g)
                x[r, idx] = x[r].max() + 1
        if kind == 3:
            x[0, torch.randint(0, vocab, (1,), generator=g)] = float("nan")
            x[-1] = float("-inf")
        if kind == 4:  # negative NaNs among ordinary values
            x[-1, torch.randint(0, vocab, (2,), generator=g)] = negative_nan
        if kind == 5:  # no positive value: the maximum is negative, or -0 tied with +0
            x = -x.abs() - 0.5
            x[0, torch.randint(0, vocab, (3,), generator=g)] = -0.0
            x[0, torch.randint(0, vocab, (3,), generator=g)] = 0.0
            x[-1, torch.randint(0, vocab, (3,), generator=g)] = -0.0
        if kind == 6:  # infinities: +inf is the maximum; +inf with -inf sums to NaN
            x[0, torch.randint(0, vocab, (2,), generator=g)] = float("inf")
            x[-1, torch.randint(0, vocab, (2,), generator=g)] = float("inf")
            x[-1, torch.randint(0, vocab, (2,), generator=g)] = float("-inf")
        for dtype in (torch.float32, torch.bfloat16):
            y = x.to(dtype)
            assert torch.equal(greedy_argmax(y), y.argmax(dim=-1)), (vocab, trial, dtype)


def test_model_dtype_logits_sample_as_their_float32_upcast() -> None:
    """The model hands over bf16 logits on a bf16 model; every feature (argmax, penalties,
    bias, min_tokens, temperature/top-k/top-p/min-p draws, logprobs) must give exactly what
    the same logits upcast to float32 give."""
    x = (logits_rows(8, seed=3) * 4).to(torch.bfloat16)
    x[0, 5] = x[0, 9] = x[0].max() + 1  # a tie: the first index wins in both
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logit_bias={2: 3.0}, logprobs=3),
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[int(x[2].argmax())]),
        SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, seed=11, logprobs=2),
        SamplingParams(temperature=1.2, top_k=4, seed=12),
        SamplingParams(temperature=0.9, top_p=0.7, seed=13),
        SamplingParams(temperature=1.0, min_p=0.2, seed=14),
    ]

    def run(logits: torch.Tensor):
        seqs = [seq(p, prompt=[1, 2, 3], output=[4, 4]) for p in params]
        return sampler()(logits, seqs)

    low, high = run(x), run(x.float())
    assert low.token_ids == high.token_ids
    assert low.logprobs == high.logprobs
    assert low.token_ids[0] == 5


def test_temperature_is_not_rounded_to_the_logits_dtype() -> None:
    """Temperatures divide float32 logits at full precision, whatever dtype the logits came in
    (a bf16 temperature 0.8 would be 0.80078125, which moves some draws near the boundary)."""
    rows = 20_000
    x = torch.tensor([[1.0, 0.0]] * rows, dtype=torch.bfloat16)  # exact in bf16
    seqs = [seq(SamplingParams(temperature=0.8)) for _ in range(rows)]
    got = Sampler(2, torch.device("cpu"), seed=0)._sample(x, seqs)
    want = Sampler(2, torch.device("cpu"), seed=0)._sample(x.float(), seqs)
    assert torch.equal(got, want)
