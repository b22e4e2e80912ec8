"""The native LM head's 8-bit screen for greedy rows (``native_cpu.screened_argmax``): its
tokens are the bf16 kernel's argmax bit for bit, on any weights and rows (outlier features,
outlier outputs, exact ties, zero rows, NaN, infinities, overflow), and on ordinary logits it
recomputes only a few groups of 16 outputs; the native backend serves greedy rows with it."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import make_checkpoint
from model.kernels import native_cpu as native
from model.loader import load_model

pytestmark = pytest.mark.skipif(
    not native.screen_available(), reason="this CPU has no AVX-512 VNNI (the screen's path)"
)

TWO_DIGIT_ROWS = native.SCREEN_TWO_DIGIT_ROWS
ROWS = range(1, 2 * TWO_DIGIT_ROWS + 3)  # two digits up to TWO_DIGIT_ROWS, one digit past


def exact(x: torch.Tensor, head: native.ScreenedHead) -> torch.Tensor:
    return native.linear_interleaved(x, head, argmax=True)


def check_rows(x: torch.Tensor, head: native.ScreenedHead, what: str) -> torch.Tensor:
    """screened_argmax against the bf16 kernel's fused argmax and its written logits' argmax;
    returns how many groups each row recomputed."""
    recomputed = torch.full((x.shape[0],), -1, dtype=torch.int64)
    screened = native.screened_argmax(x, head, recomputed)
    if screened is None:  # declined: wider than two digits serve, with outlier features
        assert x.shape[0] > TWO_DIGIT_ROWS, what
        return recomputed
    got, total = screened
    assert torch.equal(got, exact(x, head)), what
    assert torch.equal(got, head(x).argmax(dim=-1)), what
    assert ((recomputed >= 1) & (recomputed <= head.weight.shape[0])).all(), what
    assert total == int(recomputed.sum()), what
    return recomputed


def weights(kind: str, o: int, h: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(o, h, generator=g) / h**0.5
    if kind == "outlier outputs":  # a few rows 50x the rest: their scales, not the others'
        w[:: max(1, o // 7)] *= 50
    elif kind == "integers":  # exact products: ties between equal rows and equal logits
        w = torch.randint(-3, 4, (o, h), generator=g).float()
        w[o // 3 :: 5] = w[0].clone()
    elif kind == "zero rows":
        w[::3] = 0
    return w.bfloat16()


def activations(kind: str, n: int, h: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, h, generator=g)
    if kind == "outlier features":  # as trained models' hidden states have
        x[:, 1] = 300.0
        x[:, h // 2] = -80.0
    elif kind == "integers":
        x = torch.randint(-2, 3, (n, h), generator=g).float()
    elif kind == "tiny":
        x = x * 1e-30
    return x.bfloat16()


@pytest.mark.parametrize("h", [4, 12, 64, 200])
@pytest.mark.parametrize("o", [1, 15, 16, 17, 1031])
def test_screened_tokens_are_the_bf16_kernels(o, h):
    g = torch.Generator().manual_seed(o * 1000 + h)
    for w_kind in ("gaussian", "outlier outputs", "integers", "zero rows"):
        head = native.ScreenedHead(weights(w_kind, o, h, g))
        for x_kind in ("gaussian", "outlier features", "integers", "tiny"):
            for n in ROWS:
                check_rows(activations(x_kind, n, h, g), head, f"{w_kind} {x_kind} o={o} h={h} n={n}")


def test_rows_the_bound_cannot_screen_are_computed_whole():
    """A zero row (every logit 0: the first index), NaN or inf in x, values whose products
    overflow fp32, and equal weight rows (one flat logit): each row recomputes every group it
    must, and the others in the same call are unaffected."""
    g = torch.Generator().manual_seed(7)
    o, h = 1031, 64
    head = native.ScreenedHead(weights("gaussian", o, h, g))
    groups = head.weight.shape[0]
    x = activations("gaussian", 6, h, g)
    x[0] = 0
    x[1, 5] = float("nan")
    x[2, 9] = float("inf")
    x[3, 9] = float("-inf")
    x[4] = 3e38  # finite bf16, products past fp32's range
    recomputed = check_rows(x, head, "awkward rows")
    assert recomputed[:5].tolist() == [groups] * 5
    assert recomputed[5] < groups // 4  # an ordinary row beside them is still screened

    flat = native.ScreenedHead(torch.ones(o, h).bfloat16())
    assert check_rows(activations("gaussian", 3, h, g), flat, "flat").tolist() == [groups] * 3


def test_the_bound_covers_logits_the_eight_bits_put_in_the_wrong_order():
    """Hand-made rows where the 8-bit estimate ranks a lower logit first, and only the bound's
    two terms keep the true maximum (index 20) among the groups recomputed: the weights' step
    (every weight of row 20 just under half a step, so its estimate loses 0.44 per input), and
    the activations' step, with two digits (features of 3/1024 beside one of 127, rounded to
    zero, times weights of 1) and with one (features of 16.5 and 15.5 rounded to 16)."""

    def served(w: torch.Tensor, x: torch.Tensor, rows: int = 1) -> int:
        head = native.ScreenedHead(w.bfloat16())
        xs = x.bfloat16()[None].repeat(rows, 1)
        screened = native.screened_argmax(xs, head)
        assert screened is not None
        assert torch.equal(screened[0], exact(xs, head))
        return int(screened[0][0])

    h = 64  # the weights' step: scale 1, row 20's estimate 127 against row 3's exact 154
    w = torch.zeros(40, h)
    w[[3, 20], 0] = 127
    w[20, 1:] = 0.4375  # rounds to 0: 154.5625 exactly, 127 estimated
    w[3, 1:28] = 1  # exact in 8 bits: 154
    assert served(w, torch.ones(h)) == 20

    h = 1024  # the activations' step: row 20 is 2.997 exactly and 0 estimated, row 3 2.977
    x = torch.full((h,), 3 / 1024)
    x[0] = 127
    w = torch.zeros(40, h)
    w[20, 1:] = 1
    w[3, 0] = 3 / 128
    assert served(w, x) == 20

    # One digit (wider calls, no outlier features): features of 16.5 and 15.5 both round to 16,
    # so row 20 (+1 on the first, -1 on the second: 15 exactly, 0 estimated) falls behind row 3
    # (14 both ways). Logits near 0 keep the bf16 window around the best lower bound narrow.
    h = 64
    x = torch.full((h,), 16.0)
    x[0], x[1:16], x[16:31] = 127, 16.5, 15.5
    w = torch.zeros(40, h)
    w[20, 1:16], w[20, 16:31] = 1, -1
    w[3, 40] = 0.875
    assert served(w, x, rows=TWO_DIGIT_ROWS + 1) == 20


@pytest.mark.parametrize("h", [64, 640])
def test_the_screen_recomputes_few_groups_on_ordinary_logits(h):
    """Gaussian weights and hidden states: the bound admits a few percent of the groups, with
    two digits (up to 8 rows, outlier features too) and with one (wider calls)."""
    g = torch.Generator().manual_seed(h)
    o = 32768
    head = native.ScreenedHead(weights("gaussian", o, h, g))
    for kind, n in (("gaussian", 4), ("outlier features", 4), ("gaussian", 16), ("gaussian", 64)):
        recomputed = check_rows(activations(kind, n, h, g), head, kind)
        groups = head.weight.shape[0]
        limit = groups // 20 if n <= TWO_DIGIT_ROWS else groups // 8  # one digit: twice as wide
        assert recomputed.min() >= 1 and recomputed.float().median() <= groups // 20, (kind, n)
        assert recomputed.max() <= limit, (kind, n, recomputed.tolist())
    # Wider than two digits serve, a row with outlier features: declined, for the bf16 kernel.
    x = activations("gaussian", TWO_DIGIT_ROWS + 1, h, g)
    x[2, 2] = 1000.0
    assert native.screened_argmax(x, head) is None


def test_the_screen_is_the_weight_in_eight_bits():
    g = torch.Generator().manual_seed(1)
    w = weights("outlier outputs", 37, 12, g)
    head = native.ScreenedHead(w)
    assert head.screen.shape == (3, 3, 16, 4) and head.screen.dtype == torch.uint8
    q = head.screen.permute(0, 2, 1, 3).reshape(48, 12)[:37].float() - 128
    scale = head.scale[:37, None]
    # Half a step, up to fp32 rounding (the kernel's bound carries 1% of slack for it).
    assert ((q * scale - w.float()).abs() <= scale / 2 * (1 + 1e-4)).all()
    assert q.abs().amax(dim=1).eq(127).all()  # each row's largest weight uses the full range
    assert (head.l1[:37] >= w.float().abs().sum(dim=1)).all()
    assert (head.scale[37:] == 0).all() and (head.l1[37:] == 0).all()
    assert head.nbytes == w.numel() * 2 + 48 * 12 * 2 - 37 * 12 * 2 + 48 * 12 + 2 * 48 * 4
    with pytest.raises(ValueError):
        native.ScreenedHead(torch.randn(7, 6).bfloat16())  # H not a multiple of 4


def test_the_native_backend_serves_greedy_rows_from_the_screen(tmp_path, monkeypatch):
    """The native backend's greedy rows take the screen, and each mode (two digits, one) stands
    aside for a while after a call whose bound admitted too much of the head."""
    make_checkpoint(tmp_path / "ck", preset="tiny", seed=5, vocab_size=4099)
    model = load_model(str(tmp_path / "ck"), dtype=torch.bfloat16, kernels="native-cpu")
    ops, w = model.kernels, model.weights
    head = w.unembedding_prepacked
    assert isinstance(head, native.ScreenedHead)
    assert model.weights_nbytes() >= head.nbytes + w.embedding.numel() * 2
    calls = []
    screened_argmax = native.screened_argmax
    monkeypatch.setattr(native, "screened_argmax", lambda *a: calls.append(a) or screened_argmax(*a))
    x = torch.randn(4 * TWO_DIGIT_ROWS, head.in_features).bfloat16()
    for n in (1, 3, TWO_DIGIT_ROWS, 4 * TWO_DIGIT_ROWS):
        assert torch.equal(ops.lm_head_argmax(x[:n], w), ops.argmax(ops.lm_head(x[:n], w)))
    assert len(calls) == 4

    assert head.weight.shape[0] > ops.SCREEN_MIN_RECOMPUTED_GROUPS  # so that a pause can come
    zero = torch.zeros(2, head.in_features).bfloat16()  # every logit 0: every group recomputed
    assert ops.lm_head_argmax(zero, w).tolist() == [0, 0]
    for _ in range(ops.SCREEN_PAUSE_CALLS):  # two-digit calls served by the bf16 kernel
        assert torch.equal(ops.lm_head_argmax(x[:2], w), ops.argmax(ops.lm_head(x[:2], w)))
    ops.lm_head_argmax(x, w)  # the one-digit mode was not paused
    assert len(calls) == 6
    ops.lm_head_argmax(x[:2], w)  # tried again
    assert len(calls) == 7


def test_each_mode_pauses_when_its_recomputing_outweighs_the_bf16_read(tmp_path):
    """Two digits (up to TWO_DIGIT_ROWS rows) pause when a call recomputes more than a quarter of
    the head's groups over all its rows; one digit when a row recomputes more than 1/32 of them.
    A pause of one mode leaves the other serving."""
    make_checkpoint(tmp_path / "ck", preset="tiny", seed=5, vocab_size=4099)
    ops = load_model(str(tmp_path / "ck"), dtype=torch.bfloat16, kernels="native-cpu").kernels
    groups = 12568  # the 20b's head
    wide = 4 * TWO_DIGIT_ROWS
    for rows in range(1, TWO_DIGIT_ROWS + 1):
        ops._judge_screen(rows, groups // 4, groups)  # 6% per row at 4 rows, 25% at 1: served
        assert ops._screens(rows)
    ops._judge_screen(wide, wide * (groups // 32), groups)
    assert ops._screens(wide)
    ops._judge_screen(TWO_DIGIT_ROWS, groups // 4 + 1, groups)
    assert not ops._screens(1) and ops._screens(wide)
    ops._judge_screen(wide, wide * (groups // 32) + wide, groups)
    assert not ops._screens(wide)
    for _ in range(ops.SCREEN_PAUSE_CALLS - 1):  # the pauses run out
        assert not ops._screens(1) and not ops._screens(wide)
    assert ops._screens(1) and ops._screens(wide)
    # A small head: a few groups recomputed pause nothing.
    ops._judge_screen(1, ops.SCREEN_MIN_RECOMPUTED_GROUPS, 100)
    ops._judge_screen(wide, wide * ops.SCREEN_MIN_RECOMPUTED_GROUPS, 100)
    assert ops._screens(1) and ops._screens(wide)
