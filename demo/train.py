"""Train the demonstration model on CPU: the exact gpt-oss network (sinks, alternating
sliding/full attention, YaRN, MoE with MXFP4 experts trained quantization-aware with a
straight-through estimator), over the corpus vocabulary plus one pooled class for all other
tokens (its logit offset by log of their count)."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from demo.data import make_example
from model.config import ModelConfig
from model.layers import YarnRope, attention_with_sinks, rms_norm
from model.mxfp4 import FP4_VALUES, SCALE_BIAS, VALUES_PER_BLOCK

CONFIG = ModelConfig(
    vocab_size=201088,
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=128,
    num_experts=4,
    experts_per_token=2,
    sliding_window=128,
)
SKILL_WEIGHTS = {
    "add": 3, "sub": 3, "mul": 4, "repeat": 2, "reverse": 3, "upper": 3, "count": 2,
    "weather_call": 2, "weather_answer": 2, "call": 3, "extract": 2, "greet": 1, "name": 2,
}  # fmt: skip
_GRID = torch.tensor(FP4_VALUES[:8])


def mxfp4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., in] -> (nibbles [..., in] uint8, scale exponents [..., in/32] int, dequantized w)."""
    shape = w.shape
    blocks = w.detach().reshape(*shape[:-1], shape[-1] // VALUES_PER_BLOCK, VALUES_PER_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-SCALE_BIAS, 127)
    scaled = blocks / torch.pow(2.0, exp)
    idx = (scaled.abs()[..., None] - _GRID).abs().argmin(-1)
    neg = (scaled < 0) & (idx > 0)
    deq = torch.where(neg, -_GRID[idx], _GRID[idx]) * torch.pow(2.0, exp)
    nibbles = (idx + 8 * neg.long()).to(torch.uint8).reshape(shape)
    return nibbles, exp.squeeze(-1).long(), deq.reshape(shape)


def ste(w: torch.Tensor) -> torch.Tensor:
    return w + (mxfp4_codes(w)[2] - w).detach()


class TinyGptOss(torch.nn.Module):
    """Parameters named as the HF checkpoint (model.layers.N.self_attn.q_proj.weight, ...), with
    experts held dense [E, out, in] and quantized on the fly; vocabulary rows compact (K+1)."""

    def __init__(self, config: ModelConfig, k: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        c, h = config, config.hidden_size
        self.config, self.k = config, k

        def p(*shape: int, std: float = 0.02, mean: float = 0.0) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=g) * std + mean)

        params = {"model.embed_tokens.weight": p(k + 1, h, std=1.0)}
        for n in range(c.num_layers):
            pre = f"model.layers.{n}"
            params[f"{pre}.input_layernorm.weight"] = p(h, std=0.0, mean=1.0)
            for proj, rows in (("q_proj", c.q_dim), ("k_proj", c.kv_dim), ("v_proj", c.kv_dim)):
                params[f"{pre}.self_attn.{proj}.weight"] = p(rows, h, std=h**-0.5)
                params[f"{pre}.self_attn.{proj}.bias"] = p(rows, std=0.0)
            params[f"{pre}.self_attn.o_proj.weight"] = p(
                h, c.q_dim, std=c.q_dim**-0.5 / math.sqrt(2 * c.num_layers)
            )
            params[f"{pre}.self_attn.o_proj.bias"] = p(h, std=0.0)
            params[f"{pre}.self_attn.sinks"] = p(c.num_heads, std=0.0)
            params[f"{pre}.post_attention_layernorm.weight"] = p(h, std=0.0, mean=1.0)
            params[f"{pre}.mlp.router.weight"] = p(c.num_experts, h, std=h**-0.5)
            params[f"{pre}.mlp.router.bias"] = p(c.num_experts, std=0.0)
            params[f"{pre}.mlp.experts.gate_up_proj"] = p(
                c.num_experts, 2 * c.intermediate_size, h, std=h**-0.5
            )
            params[f"{pre}.mlp.experts.gate_up_proj_bias"] = p(
                c.num_experts, 2 * c.intermediate_size, std=0.0
            )
            params[f"{pre}.mlp.experts.down_proj"] = p(
                c.num_experts,
                h,
                c.intermediate_size,
                std=c.intermediate_size**-0.5 / math.sqrt(2 * c.num_layers),
            )
            params[f"{pre}.mlp.experts.down_proj_bias"] = p(c.num_experts, h, std=0.0)
        params["model.norm.weight"] = p(h, std=0.0, mean=1.0)
        params["lm_head.weight"] = p(k + 1, h, std=h**-0.5)
        self.names = list(params)
        self.params = torch.nn.ParameterList(params.values())
        self.rope = YarnRope(config)
        self.pool_offset = math.log(config.vocab_size - k)

    def named(self) -> dict[str, torch.nn.Parameter]:
        return dict(zip(self.names, self.params, strict=True))

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids [B, T] compact, valid [B, T] bool -> logits [B, T, K+1] (pooled offset added)."""
        c, w = self.config, self.named()
        b, t = ids.shape
        x = w["model.embed_tokens.weight"][ids]
        pos = torch.arange(t)
        cos, sin = self.rope.cos_sin(pos)
        causal = pos[None, :] <= pos[:, None]
        near = (pos[:, None] - pos[None, :]) < c.sliding_window
        masks = {
            False: (causal[None] & valid[:, None, :]),
            True: (causal & near)[None] & valid[:, None, :],
        }
        for n in range(c.num_layers):
            pre = f"model.layers.{n}"
            hN = rms_norm(x, w[f"{pre}.input_layernorm.weight"], c.rms_norm_eps)
            q = F.linear(hN, w[f"{pre}.self_attn.q_proj.weight"], w[f"{pre}.self_attn.q_proj.bias"]).view(
                b, t, c.num_heads, c.head_dim
            )
            k = F.linear(hN, w[f"{pre}.self_attn.k_proj.weight"], w[f"{pre}.self_attn.k_proj.bias"]).view(
                b, t, c.num_kv_heads, c.head_dim
            )
            v = F.linear(hN, w[f"{pre}.self_attn.v_proj.weight"], w[f"{pre}.self_attn.v_proj.bias"]).view(
                b, t, c.num_kv_heads, c.head_dim
            )
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            a = attention_with_sinks(q, k.transpose(1, 2), v.transpose(1, 2), masks[c.is_sliding(n)],
                                     w[f"{pre}.self_attn.sinks"], c.sm_scale)  # fmt: skip
            x = x + F.linear(
                a.reshape(b, t, c.q_dim),
                w[f"{pre}.self_attn.o_proj.weight"],
                w[f"{pre}.self_attn.o_proj.bias"],
            )
            y = rms_norm(x, w[f"{pre}.post_attention_layernorm.weight"], c.rms_norm_eps)
            logits = F.linear(y, w[f"{pre}.mlp.router.weight"], w[f"{pre}.mlp.router.bias"])
            top_v, top_i = torch.topk(logits, c.experts_per_token, dim=-1)
            gates = torch.zeros_like(logits).scatter(-1, top_i, torch.softmax(top_v, -1))  # [B, T, E]
            w1, w2 = ste(w[f"{pre}.mlp.experts.gate_up_proj"]), ste(w[f"{pre}.mlp.experts.down_proj"])
            h1 = torch.einsum("bth,eoh->bteo", y, w1) + w[f"{pre}.mlp.experts.gate_up_proj_bias"]
            gate = h1[..., ::2].clamp(max=c.swiglu_limit)
            up = h1[..., 1::2].clamp(min=-c.swiglu_limit, max=c.swiglu_limit) + 1
            act = gate * torch.sigmoid(gate * c.swiglu_alpha) * up
            h2 = torch.einsum("btei,ehi->bteh", act, w2) + w[f"{pre}.mlp.experts.down_proj_bias"]
            x = x + (h2 * gates[..., None]).sum(2)
        x = rms_norm(x, w["model.norm.weight"], c.rms_norm_eps)
        out = F.linear(x, w["lm_head.weight"])
        return torch.cat([out[..., :-1], out[..., -1:] + self.pool_offset], -1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def corpus(n: int, seed: int) -> list:
    rng = random.Random(seed)
    skills = list(SKILL_WEIGHTS)
    weights = [SKILL_WEIGHTS[s] for s in skills]
    return [make_example(rng.choices(skills, weights)[0], rng, "train") for _ in range(n)]


def batches(examples: list, vocab: dict[int, int], batch_tokens: int, rng: random.Random):
    """Length-bucketed batches: (ids [B, T], valid, target [B, T] (-100 = no loss))."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].completion))
    groups, cur, cur_max = [], [], 0
    for i in order:
        n = len(examples[i].prompt) + len(examples[i].completion)
        if cur and max(cur_max, n) * (len(cur) + 1) > batch_tokens:
            groups.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        groups.append(cur)
    rng.shuffle(groups)
    for g in groups:
        seqs = [examples[i] for i in g]
        t = max(len(e.prompt) + len(e.completion) for e in seqs)
        ids = torch.zeros(len(seqs), t, dtype=torch.long)
        target = torch.full((len(seqs), t), -100, dtype=torch.long)
        valid = torch.zeros(len(seqs), t, dtype=torch.bool)
        for r, e in enumerate(seqs):
            full = [vocab[x] for x in e.prompt + e.completion]
            ids[r, : len(full)] = torch.tensor(full)
            valid[r, : len(full)] = True
            p = len(e.prompt)
            target[r, p - 1 : len(full) - 1] = torch.tensor(full[p:])
        yield ids, valid, target


def train(out: Path, seed: int = 0, minutes: float = 20.0, examples: int = 60000, batch_tokens: int = 6144,
          lr: float = 3e-3, log=print) -> dict:  # fmt: skip
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    t0 = time.time()
    data = corpus(examples, seed)
    used = sorted({t for e in data for t in e.prompt + e.completion})
    vocab = {t: i for i, t in enumerate(used)}
    log(f"corpus: {len(data)} examples, {len(used)} used tokens, {time.time() - t0:.0f}s")
    model = TinyGptOss(CONFIG, len(used), seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    budget = minutes * 60
    start = time.time()
    step, tokens, epoch = 0, 0, 0
    rng = random.Random(seed)
    done = False
    while not done:
        for ids, valid, target in batches(data, vocab, batch_tokens, rng):
            frac = (time.time() - start) / budget
            if frac >= 1:
                done = True
                break
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, step / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            logits = model(ids, valid)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), target.view(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens += int(valid.sum())
            if step % 50 == 0:
                el = time.time() - start
                log(
                    f"step {step} epoch {epoch} loss {loss.item():.4f} tok/s {tokens / el:.0f} elapsed {el:.0f}s"
                )
        epoch += 1
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state": {k: v.detach() for k, v in model.named().items()}, "used": used, "seed": seed,
                "config": CONFIG.to_hf_dict()}, out / "trained.pt")  # fmt: skip
    summary = {
        "steps": step,
        "tokens": tokens,
        "seconds": time.time() - start,
        "loss": loss.item(),
        "used": len(used),
    }
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    log(json.dumps(summary))
    return summary
