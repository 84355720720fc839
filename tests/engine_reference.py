"""A straightforward routed forward to hold the serving engine to: one full sequence, no cache,
no batching, no fused weights, and every token looked up in its own weight dictionary.

For token t, ``weights[t]`` is a whole state dict (canonical Llama names, float32) — the weight
set that token runs through — and every Linear / RMSNorm of every layer takes that token's
tensor; attention mixes all tokens causally (GQA by repeating the key / value heads).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def routed_reference(config: LlamaConfig, embeddings: torch.Tensor, weights: list[dict[str, torch.Tensor]],
                     head: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) for input ``embeddings`` (T, hidden); ``head`` (vocab, hidden)."""
    T = embeddings.shape[0]
    H, KV = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // H
    eps = config.rms_norm_eps
    rope = LlamaRotaryEmbedding(config)
    cos, sin = rope(embeddings, torch.arange(T)[None])
    x = embeddings.clone()

    def per_token(name: str, h: torch.Tensor) -> torch.Tensor:
        return torch.stack([h[t] @ weights[t][name].t() for t in range(T)])

    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = torch.stack([_rms(x[t], weights[t][p + "input_layernorm.weight"], eps) for t in range(T)])
        q = per_token(p + "self_attn.q_proj.weight", h).view(T, H, d).transpose(0, 1)
        k = per_token(p + "self_attn.k_proj.weight", h).view(T, KV, d).transpose(0, 1)
        v = per_token(p + "self_attn.v_proj.weight", h).view(T, KV, d).transpose(0, 1)
        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        k, v = k[0].repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
        scores = (q[0] @ k.transpose(1, 2)) / d ** 0.5
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, H * d)
        x = x + per_token(p + "self_attn.o_proj.weight", attn)
        h = torch.stack([_rms(x[t], weights[t][p + "post_attention_layernorm.weight"], eps) for t in range(T)])
        gate, up = per_token(p + "mlp.gate_proj.weight", h), per_token(p + "mlp.up_proj.weight", h)
        x = x + per_token(p + "mlp.down_proj.weight", torch.nn.functional.silu(gate) * up)
    x = torch.stack([_rms(x[t], weights[t]["model.norm.weight"], eps) for t in range(T)])
    return x @ head.t()
