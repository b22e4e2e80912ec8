"""The trainable network: the exact gpt-oss structure (sinks, alternating sliding/full attention,
YaRN RoPE, top-k MoE with SwiGLU experts), parameters named as in the HF checkpoint, experts
trained quantization-aware (straight-through MXFP4), vocabulary rows compact: the K tokens the
corpus uses plus one pooled row standing for all the others (its logit offset by log(V - K))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.layers import YarnRope, attention_with_sinks, rms_norm
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


def init_params(config: ModelConfig, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, h = config, config.hidden_size
    depth = math.sqrt(2 * c.num_layers)

    def p(*shape: int, std: float = 0.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    params = {"model.embed_tokens.weight": p(k + 1, h, std=1.0)}
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
    params["model.norm.weight"] = p(h, mean=1.0)
    params["lm_head.weight"] = p(k + 1, h, std=h**-0.5)
    return params


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


class TinyGptOss(torch.nn.Module):
    def __init__(self, config: ModelConfig, k: int, seed: int) -> None:
        super().__init__()
        self.config, self.k = config, k
        params = init_params(config, k, seed)
        self.names = list(params)
        self.params = torch.nn.ParameterList([torch.nn.Parameter(v) for v in params.values()])
        self.rope = YarnRope(config)
        offset = torch.zeros(k + 1)
        offset[-1] = math.log(config.vocab_size - k)
        self.register_buffer("pool_offset", offset, persistent=False)

    def named(self) -> dict[str, torch.nn.Parameter]:
        return dict(zip(self.names, self.params, strict=True))

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

    def hidden(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids [B, T] compact, valid [B, T] bool -> final hidden states [B, T, h] (after the norm)."""
        c, w = self.config, self.named()
        b, t = ids.shape
        x = w["model.embed_tokens.weight"][ids]
        pos = torch.arange(t)
        cos, sin = self.rope.cos_sin(pos)
        causal = pos[None, :] <= pos[:, None]
        near = (pos[:, None] - pos[None, :]) < c.sliding_window
        masks = {False: causal[None] & valid[:, None, :], True: (causal & near)[None] & valid[:, None, :]}
        for n in range(c.num_layers):
            pre = f"model.layers.{n}"
            hn = rms_norm(x, w[f"{pre}.input_layernorm.weight"], c.rms_norm_eps)

            def proj(name: str, heads: int, hn: torch.Tensor = hn, pre: str = pre) -> torch.Tensor:
                out = F.linear(hn, w[f"{pre}.self_attn.{name}.weight"], w[f"{pre}.self_attn.{name}.bias"])
                return out.view(b, t, heads, c.head_dim)

            q = _rope(proj("q_proj", c.num_heads), cos, sin)
            k = _rope(proj("k_proj", c.num_kv_heads), cos, sin)
            v = proj("v_proj", c.num_kv_heads)
            a = attention_with_sinks(q, k.transpose(1, 2), v.transpose(1, 2), masks[c.is_sliding(n)],
                                     w[f"{pre}.self_attn.sinks"], c.sm_scale)  # fmt: skip
            a = a.to(x.dtype).reshape(b, t, c.q_dim)
            x = x + F.linear(a, w[f"{pre}.self_attn.o_proj.weight"], w[f"{pre}.self_attn.o_proj.bias"])
            y = rms_norm(x, w[f"{pre}.post_attention_layernorm.weight"], c.rms_norm_eps)
            x = x + self._moe(y.reshape(b * t, -1), pre, w).view(b, t, -1).to(x.dtype)
        return rms_norm(x, w["model.norm.weight"], c.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., h] -> logits [..., K+1] over the used tokens and the pooled class."""
        return F.linear(hidden, self.named()["lm_head.weight"]).float() + self.pool_offset
