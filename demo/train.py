"""Train the demonstration model on CPU (see demo/model.py for the network).

The loss is on the assistant's tokens only; examples in random order are packed into rows
(attention kept inside each example), so every batch mixes the skills;
matmuls run under bf16 autocast (measured 1.5x faster than fp32 on this CPU: avx512_bf16);
the learning rate warms up, then follows a cosine to zero over `steps` (or over the time
budget if that runs out first, so a slower machine still ends annealed). Fresh examples are
drawn for every chunk of the run; the vocabulary is the tokens of the first chunk.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from demo.data import Example, make_example
from demo.model import TinyGptOss
from harmony.tokenizer import load_tokenizer
from model.config import ModelConfig

CONFIG = ModelConfig(
    vocab_size=201088, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
    intermediate_size=128, num_experts=4, experts_per_token=2, sliding_window=128,
)  # fmt: skip
SKILL_WEIGHTS = {  # more of the character-level skills that earlier runs left under 95%
    "add": 2, "sub": 4, "mul": 5, "repeat": 6, "reverse": 6, "upper": 3, "count": 3,
    "weather_call": 3, "weather_answer": 2, "call": 3, "extract": 2, "greet": 1, "name": 1,
}  # fmt: skip
CHUNK = 20000
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def corpus(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    skills = list(SKILL_WEIGHTS)
    weights = [SKILL_WEIGHTS[s] for s in skills]
    return [make_example(rng.choices(skills, weights)[0], rng, "train") for _ in range(n)]


def batches(
    examples: list[Example], vocab: dict[int, int], batch_tokens: int, rng: random.Random, row: int = 384
) -> Iterator[Batch]:
    """Packed batches of examples in random order (so every batch mixes the skills):
    (ids [B, row], segment [B, row] (-1 = padding), target [B, row] with -100 = no loss).
    Attention stays inside a segment. Tokens outside `vocab` map to the pooled class."""
    pooled = len(vocab)
    order = list(range(len(examples)))
    rng.shuffle(order)
    rows: list[list[int]] = [[]]
    for i in order:
        n = len(examples[i].prompt) + len(examples[i].completion)
        if sum(len(examples[j].prompt) + len(examples[j].completion) for j in rows[-1]) + n > row:
            rows.append([])
        rows[-1].append(i)
    per_batch = max(1, batch_tokens // row)
    for b0 in range(0, len(rows), per_batch):
        group = rows[b0 : b0 + per_batch]
        ids = torch.zeros(len(group), row, dtype=torch.long)
        seg = torch.full((len(group), row), -1, dtype=torch.long)
        target = torch.full((len(group), row), -100, dtype=torch.long)
        for r, members in enumerate(group):
            at = 0
            for s, i in enumerate(members):
                e = examples[i]
                full = [vocab.get(x, pooled) for x in e.prompt + e.completion]
                ids[r, at : at + len(full)] = torch.tensor(full)
                seg[r, at : at + len(full)] = s
                p = len(e.prompt)
                target[r, at + p - 1 : at + len(full) - 1] = torch.tensor(full[p:])
                at += len(full)
        yield ids, seg, target


def save(out: Path, model: TinyGptOss, used: list[int], seed: int, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = model.state()
    torch.save({"state": state, "used": used, "seed": seed, "config": model.config.to_hf_dict()},
               out / "trained.pt.tmp")  # fmt: skip
    (out / "trained.pt.tmp").replace(out / "trained.pt")
    (out / "train.json").write_text(json.dumps(summary, indent=2))


def train(out: Path, seed: int = 0, steps: int = 9000, minutes: float = 58.0, batch_tokens: int = 4096,
          lr: float = 3e-3, warmup: int = 100, log: Callable[[str], None] = print) -> dict:  # fmt: skip
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    t0 = time.time()
    first = corpus(2 * CHUNK, seed)
    used = sorted({t for e in first for t in e.prompt + e.completion})
    vocab = {t: i for i, t in enumerate(used)}
    log(f"corpus: {len(first)} examples, {len(used)} used tokens, {time.time() - t0:.0f}s")
    tok = load_tokenizer()
    model = TinyGptOss(
        CONFIG, len(used), seed, [None if tok.is_special(t) else tok.token_bytes(t) for t in used]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    start, budget = time.time(), minutes * 60
    step, tokens, loss_avg, chunk, last_save = 0, 0, 0.0, 0, time.time()
    rng = random.Random(seed)
    data = first
    summary: dict = {}
    while step < steps:
        for ids, seg, target in batches(data, vocab, batch_tokens, rng):
            frac = max(step / steps, (time.time() - start) / budget)
            if frac >= 1:
                break
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
            sel = target != -100
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model.logits(model.hidden(ids, seg)[sel])
            loss = F.cross_entropy(logits, target[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens += int((seg >= 0).sum())
            loss_avg = loss.item() if step == 1 else 0.98 * loss_avg + 0.02 * loss.item()
            el = time.time() - start
            summary = {"steps": step, "tokens": tokens, "seconds": round(el), "loss": round(loss_avg, 4),
                       "used": len(used), "seed": seed, "lr": lr, "batch_tokens": batch_tokens}  # fmt: skip
            if step % 50 == 0:
                log(
                    f"step {step} frac {frac:.3f} loss {loss_avg:.4f} tok/s {tokens / el:.0f} elapsed {el:.0f}s"
                )
            if time.time() - last_save > 600:
                save(out, model, used, seed, summary)
                last_save = time.time()
        else:
            chunk += 1
            data = corpus(CHUNK, seed * 1000 + chunk)
            continue
        break
    save(out, model, used, seed, summary)
    log(json.dumps(summary))
    return summary
