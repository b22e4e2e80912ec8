"""The trainable network: the exact gpt-oss structure (sinks, alternating sliding/full attention,
YaRN RoPE, top-k MoE with SwiGLU experts), parameters named as in the HF checkpoint, experts
trained quantization-aware (straight-through MXFP4), vocabulary rows compact: the K tokens the
corpus uses plus one pooled row standing for all the others (its logit offset by log(V - K))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.layers import YarnRope, rms_norm
from model.mxfp4 import FP4_VALUES, SCALE_BIAS, VALUES_PER_BLOCK

_GRID = torch.tensor(FP4_VALUES[:8])


def mxfp4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., in] -> (nibbles [..., in] uint8, scale exponents [..., in/32] int, dequantized w)."""
    shape = w.shape
    blocks = w.detach().float().reshape(*shape[:-1], shape[-1] // VALUES_PER_BLOCK, VALUES_PER_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-SCALE_BIAS, 127)
    scaled = blocks / torch.pow(2.0, exp)
    idx = (scaled.abs()[..., None] - _GRID).abs().argmin(-1)
    neg = (scaled < 0) & (idx > 0)
    deq = torch.where(neg, -_GRID[idx], _GRID[idx]) * torch.pow(2.0, exp)
    nibbles = (idx + 8 * neg.long()).to(torch.uint8).reshape(shape)
    return nibbles, exp.squeeze(-1).long(), deq.reshape(shape)


def ste(w: torch.Tensor) -> torch.Tensor:
    """Straight-through MXFP4: the forward pass sees the packed values, the gradient is identity."""
    return w + (mxfp4_codes(w)[2] - w).detach()


SPELLING_WEIGHT = 0.85  # the share of an embedding's variance that describes its characters


def spelling_embeddings(token_bytes: list[bytes | None], h: int, g: torch.Generator) -> torch.Tensor:
    """[len(token_bytes), h] unit-variance codes of what each token spells: a sum of random
    vectors for each lowercased character by its position from the start and from the end,
    for the characters regardless of position, the length, a leading space and capitals.
    (None = a special token: no spelling.) Copying " Kate" as "Kate", "794" as its digits, a
    word as its letters or in capitals then shares one learned map across all tokens instead
    of one per token, which a tiny model could never see often enough in an hour."""
    first, last = torch.randn(8, 256, h, generator=g), torch.randn(8, 256, h, generator=g)
    anywhere, length = torch.randn(256, h, generator=g), torch.randn(16, h, generator=g)
    space, capital = torch.randn(h, generator=g), torch.randn(h, generator=g)
    out = torch.zeros(len(token_bytes), h)
    for n, raw in enumerate(token_bytes):
        if not raw:
            continue
        body = raw.lstrip(b" ")
        low = body.lower()
        parts = [first[i, c] for i, c in enumerate(low[:8])] + [
            last[j, c] for j, c in enumerate(low[::-1][:8])
        ]
        parts += [anywhere[c] for c in set(low)] + [length[min(len(body), 15)]]
        parts += [space] * (len(raw) > len(body)) + [capital] * (body != low)
        code = torch.stack(parts).sum(0)
        out[n] = code / code.std()
    return out


def init_params(
    config: ModelConfig, k: int, seed: int, token_bytes: list[bytes | None] | None = None
) -> dict[str, torch.Tensor]:
    """`token_bytes` (the K used tokens' bytes): embeddings start from their spelling."""
    g = torch.Generator().manual_seed(seed)
    c, h = config, config.hidden_size
    depth = math.sqrt(2 * c.num_layers)

    def p(*shape: int, std: float = 0.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    # The unembedding is tied to the embedding while training (see TinyGptOss): a head that
    # moves a token's embedding forward then already raises that token's logit, so copying a
    # value from the prompt needs no per-token map to be learned. Exported as two tensors.
    # Unit-scale embeddings keep a token's identity dominant in the residual stream; the final
    # norm starts at 0.1 so that the tied logits start moderate.
    params = {"model.embed_tokens.weight": p(k + 1, h, std=1.0)}
    if token_bytes is not None:
        spelled = torch.cat([spelling_embeddings(token_bytes, h, g), torch.zeros(1, h)])
        mix = torch.tensor([SPELLING_WEIGHT if b else 0.0 for b in token_bytes] + [0.0])[:, None]
        noise = params["model.embed_tokens.weight"]
        params["model.embed_tokens.weight"] = (1 - mix).sqrt() * noise + mix.sqrt() * spelled
    for n in range(c.num_layers):
        pre = f"model.layers.{n}"
        params[f"{pre}.input_layernorm.weight"] = p(h, mean=1.0)
        for proj, rows in (("q_proj", c.q_dim), ("k_proj", c.kv_dim), ("v_proj", c.kv_dim)):
            params[f"{pre}.self_attn.{proj}.weight"] = p(rows, h, std=h**-0.5)
            params[f"{pre}.self_attn.{proj}.bias"] = p(rows)
        params[f"{pre}.self_attn.o_proj.weight"] = p(h, c.q_dim, std=c.q_dim**-0.5 / depth)
        params[f"{pre}.self_attn.o_proj.bias"] = p(h)
        params[f"{pre}.self_attn.sinks"] = p(c.num_heads)
        params[f"{pre}.post_attention_layernorm.weight"] = p(h, mean=1.0)
        params[f"{pre}.mlp.router.weight"] = p(c.num_experts, h, std=h**-0.5)
        params[f"{pre}.mlp.router.bias"] = p(c.num_experts)
        e, i = c.num_experts, c.intermediate_size
        params[f"{pre}.mlp.experts.gate_up_proj"] = p(e, 2 * i, h, std=h**-0.5)
        params[f"{pre}.mlp.experts.gate_up_proj_bias"] = p(e, 2 * i)
        params[f"{pre}.mlp.experts.down_proj"] = p(e, h, i, std=i**-0.5 / depth)
        params[f"{pre}.mlp.experts.down_proj_bias"] = p(e, h)
    params["model.norm.weight"] = p(h, mean=0.1)
    return params


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor,
              scale: float) -> torch.Tensor:  # fmt: skip
    """The serving path's attention with sinks (model.layers.attention_with_sinks) in PyTorch's
    fused CPU attention kernel: ~4x faster forward and backward than the explicit softmax.
    A head's sink logit is an extra key every query sees with a zero value: query head h gets
    one more dimension holding sinks[h] / scale, the real keys a 0 there and the sink key a 1.
    Head dims are zero-padded to a multiple of 8 and KV heads expanded, as the fused kernel
    requires (otherwise PyTorch silently takes its slow reference path).
    q [B, T, H, D]; k, v [B, T, KVH, D]; allowed [B, 1, T, 1 + T] additive (0 or -inf;
    column 0 = the sink), in q's dtype. Returns [B, T, H, D]."""
    b, t, h, d = q.shape
    g, width = h // k.shape[2], (d + 1 + 7) // 8 * 8

    def heads(x: torch.Tensor, first: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2).repeat_interleave(g, 1) if x.shape[2] != h else x.transpose(1, 2)
        x = torch.cat([x, extra.expand(b, h, t, 1).to(x.dtype), x.new_zeros(b, h, t, width - d - 1)], -1)
        return x if first is None else torch.cat([first.to(x.dtype).expand(b, h, 1, width), x], 2)

    zero = q.new_zeros(1, 1, 1, 1)
    sink_key = torch.cat([q.new_zeros(d), q.new_ones(1), q.new_zeros(width - d - 1)]).view(1, 1, 1, width)
    out = F.scaled_dot_product_attention(
        heads(q, None, (sinks / scale).view(1, h, 1, 1)),
        heads(k, sink_key, zero),
        heads(v, q.new_zeros(1, 1, 1, width), zero),
        attn_mask=allowed.to(q.dtype),
        scale=scale,
    )
    return out[..., :d].transpose(1, 2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


class TinyGptOss(torch.nn.Module):
    def __init__(
        self, config: ModelConfig, k: int, seed: int, token_bytes: list[bytes | None] | None = None
    ) -> None:
        super().__init__()
        self.config, self.k = config, k
        params = init_params(config, k, seed, token_bytes)
        self.names = list(params)
        self.params = torch.nn.ParameterList([torch.nn.Parameter(v) for v in params.values()])
        self.rope = YarnRope(config)
        offset = torch.zeros(k + 1)
        offset[-1] = math.log(config.vocab_size - k)
        self.register_buffer("pool_offset", offset, persistent=False)

    def named(self) -> dict[str, torch.nn.Parameter]:
        return dict(zip(self.names, self.params, strict=True))

    def state(self) -> dict[str, torch.Tensor]:
        """The weights under their HF names, the tied unembedding as its own tensor."""
        out = {k: v.detach().clone() for k, v in self.named().items()}
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
        return out

    def _moe(self, y: torch.Tensor, pre: str, w: dict[str, torch.nn.Parameter]) -> torch.Tensor:
        """y [N, h] -> [N, h]. Every expert runs on every token (E is small) and the gates
        (zero outside the top-k) weight the down projection, so both projections are one matmul."""
        c = self.config
        e, i, h = c.num_experts, c.intermediate_size, c.hidden_size
        logits = F.linear(y, w[f"{pre}.mlp.router.weight"], w[f"{pre}.mlp.router.bias"])
        top_v, top_i = torch.topk(logits.float(), c.experts_per_token, dim=-1)
        gates = torch.zeros_like(logits, dtype=torch.float32).scatter(-1, top_i, torch.softmax(top_v, -1))
        w1 = ste(w[f"{pre}.mlp.experts.gate_up_proj"]).reshape(e * 2 * i, h)
        h1 = F.linear(y, w1, w[f"{pre}.mlp.experts.gate_up_proj_bias"].reshape(-1)).view(-1, e, 2 * i)
        gate = h1[..., ::2].clamp(max=c.swiglu_limit)
        up = h1[..., 1::2].clamp(min=-c.swiglu_limit, max=c.swiglu_limit) + 1
        act = gate * torch.sigmoid(gate * c.swiglu_alpha) * up  # [N, E, I]
        act = (act * gates[..., None].to(act.dtype)).reshape(-1, e * i)
        w2 = ste(w[f"{pre}.mlp.experts.down_proj"]).permute(1, 0, 2).reshape(h, e * i)
        bias = gates.to(act.dtype) @ w[f"{pre}.mlp.experts.down_proj_bias"].to(act.dtype)
        return F.linear(act, w2) + bias

    def hidden(self, ids: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        """ids [B, T] compact, segment [B, T] (which packed example; -1 = padding; a bool mask
        = one example) -> final hidden states [B, T, h] (after the norm)."""
        c, w = self.config, self.named()
        b, t = ids.shape
        x = w["model.embed_tokens.weight"][ids]
        pos = torch.arange(t)
        cos, sin = self.rope.cos_sin(pos)
        causal = pos[None, :] <= pos[:, None]
        near = (pos[:, None] - pos[None, :]) < c.sliding_window
        seg = segment.long() if segment.dtype != torch.bool else torch.where(segment, 0, -1)
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
        sink = torch.ones(b, t, 1, dtype=torch.bool)
        masks = {w: torch.zeros(b, 1, t, t + 1).masked_fill(~torch.cat([sink, m], -1)[:, None], float("-inf"))
                 for w, m in ((False, causal[None] & same), (True, (causal & near)[None] & same))}  # fmt: skip
        for n in range(c.num_layers):
            pre = f"model.layers.{n}"
            hn = rms_norm(x, w[f"{pre}.input_layernorm.weight"], c.rms_norm_eps)

            def proj(name: str, heads: int, hn: torch.Tensor = hn, pre: str = pre) -> torch.Tensor:
                out = F.linear(hn, w[f"{pre}.self_attn.{name}.weight"], w[f"{pre}.self_attn.{name}.bias"])
                return out.view(b, t, heads, c.head_dim)

            q = _rope(proj("q_proj", c.num_heads), cos, sin)
            k = _rope(proj("k_proj", c.num_kv_heads), cos, sin)
            v = proj("v_proj", c.num_kv_heads)
            a = attention(q, k, v, masks[c.is_sliding(n)], w[f"{pre}.self_attn.sinks"], c.sm_scale)
            a = a.to(x.dtype).reshape(b, t, c.q_dim)
            x = x + F.linear(a, w[f"{pre}.self_attn.o_proj.weight"], w[f"{pre}.self_attn.o_proj.bias"])
            y = rms_norm(x, w[f"{pre}.post_attention_layernorm.weight"], c.rms_norm_eps)
            x = x + self._moe(y.reshape(b * t, -1), pre, w).view(b, t, -1).to(x.dtype)
        return rms_norm(x, w["model.norm.weight"], c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., h] -> logits [..., K+1] over the used tokens and the pooled class."""
        return F.linear(hidden, self.named()["model.embed_tokens.weight"]).float() + self.pool_offset
