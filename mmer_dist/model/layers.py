"""The routed decoder's operations on a step's flat tokens (no batch axis, no padding).

Tokens arrive sorted by weight set (``RoutingPlan``): a Linear or RMSNorm is one plain matmul or
multiply per segment, and exactly the plain op when the step has one weight set. Attention runs
per request, over its cache and its new tokens, in natural order. Numerics follow transformers'
Llama (float32 RMSNorm statistics, weight applied in the input dtype; RoPE cos/sin in the input
dtype; SDPA with GQA), which the engine's tests hold it to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mmer_dist.model.batch import RoutingPlan
from mmer_dist.model.kv_cache import RequestCache


def grouped_linear(x: torch.Tensor, plan: RoutingPlan, weights: Sequence[torch.Tensor],
                   biases: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``x`` (T, in) sorted by group; group g's rows through ``weights[g]`` (out, in)."""
    if len(weights) == 1:
        return F.linear(x, weights[0], biases[0])
    out = x.new_empty((x.shape[0], weights[0].shape[0]))
    for (a, b), w, bias in zip(plan.segments, weights, biases):
        if b > a:
            if bias is None:
                torch.mm(x[a:b], w.t(), out=out[a:b])
            else:
                torch.addmm(bias, x[a:b], w.t(), out=out[a:b])
    return out


def grouped_rms_norm(x: torch.Tensor, plan: RoutingPlan, weights: Sequence[torch.Tensor], eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    if len(weights) == 1:
        return weights[0] * h
    out = torch.empty_like(h)
    for (a, b), w in zip(plan.segments, weights):
        if b > a:
            torch.mul(w, h[a:b], out=out[a:b])
    return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def attention(qkv: torch.Tensor, plan: RoutingPlan, caches: Sequence[RequestCache], layer: int,
              cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """``qkv`` (T, (H + 2 KV) * d) in natural order -> (T, H * d). Writes each request's new keys
    and values into its cache at [past, past + n) of ``layer`` and attends over [0, past + n)."""
    q_end, k_end = n_heads * head_dim, (n_heads + n_kv_heads) * head_dim
    out = qkv.new_empty((qkv.shape[0], q_end))
    for (start, n, past), cache in zip(plan.spans, caches):
        block = qkv[start:start + n]
        q = block[:, :q_end].view(n, n_heads, head_dim).transpose(0, 1)
        k = block[:, q_end:k_end].view(n, n_kv_heads, head_dim).transpose(0, 1)
        v = block[:, k_end:].view(n, n_kv_heads, head_dim).transpose(0, 1)
        q, k = apply_rotary_pos_emb(q, k, cos[start:start + n], sin[start:start + n], unsqueeze_dim=0)
        cache.keys[layer, :, past:past + n] = k
        cache.values[layer, :, past:past + n] = v
        keys, values = cache.keys[layer, :, :past + n], cache.values[layer, :, :past + n]
        mask, causal = None, False
        if n > 1 and past == 0:
            causal = True
        elif n > 1:  # new tokens after cached ones: token i sees [0, past + i]
            mask = (torch.arange(past + n, device=qkv.device)[None, :]
                    <= (past + torch.arange(n, device=qkv.device))[:, None])
        o = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, is_causal=causal,
                                           scale=head_dim ** -0.5, enable_gqa=n_kv_heads != n_heads)
        out[start:start + n] = o[0].transpose(0, 1).reshape(n, q_end)
    return out
