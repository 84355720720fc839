"""The routed decoder's operations on a step's flat tokens (no batch axis, no padding).

Tokens arrive sorted by weight set (``RoutingPlan``): a Linear or RMSNorm is one plain matmul or
multiply per segment, and exactly the plain op when the step has one weight set. Attention runs
over each request's cache and its new tokens, in natural order: requests decoding one token in
one padded call, prefills per request. Numerics follow transformers'
Llama (float32 RMSNorm statistics, weight applied in the input dtype; RoPE cos/sin in the input
dtype; SDPA with GQA), which the engine's tests hold it to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mmer_dist.model import native
from mmer_dist.model.batch import RoutingPlan
from mmer_dist.model.kv_cache import RequestCache


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, except for bf16 / fp16 weights on the CPU: there the compiled kernel
    (``native.dense``, float32 accumulation as torch's, 2-4x faster at decode on CPUs without bf16
    instructions, measured: torch converts and packs the whole matrix on every call)."""
    if x.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16) and (lib := native.load()) is not None:
        out = lib.dense(x.float().contiguous(), w.contiguous())
        if bias is not None:
            out += bias
        return out.to(x.dtype)
    return F.linear(x, w, bias)


def grouped_linear(x: torch.Tensor, plan: RoutingPlan, weights: Sequence[torch.Tensor | None],
                   biases: Sequence[torch.Tensor | None], out_features: int) -> torch.Tensor:
    """``x`` (T, in) sorted by group; group g's rows through ``weights[g]`` (out, in). A group whose
    weight is None is left unwritten (the mask-native path fills it)."""
    if len(weights) == 1 and weights[0] is not None:
        return linear(x, weights[0], biases[0])
    out = x.new_empty((x.shape[0], out_features))
    for (a, b), w, bias in zip(plan.segments, weights, biases):
        if b > a and w is not None:
            out[a:b] = linear(x[a:b], w, bias)
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
    and values into its cache at [past, past + n) of ``layer`` and attends over [0, past + n).
    Requests decoding one token attend together in one padded, masked SDPA call (one kernel
    launch per layer instead of one per request: what batch decode costs); prefills one by one."""
    q_end = n_heads * head_dim
    out = qkv.new_empty((qkv.shape[0], q_end))
    dims = (n_heads, n_kv_heads, head_dim)
    decoding = [i for i, (_, n, _) in enumerate(plan.spans) if n == 1]
    if len(decoding) > 1:
        _decode_together(qkv, out, [plan.spans[i] for i in decoding], [caches[i] for i in decoding], layer, cos, sin,
                         *dims)
    alone = set(range(len(plan.spans))) - (set(decoding) if len(decoding) > 1 else set())
    for i in sorted(alone):
        _attend_one(qkv, out, plan.spans[i], caches[i], layer, cos, sin, *dims)
    return out


def _split_qkv(block: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int):
    """(n, (H + 2 KV) * d) -> q (H, n, d), k and v (KV, n, d)."""
    n, q_end, k_end = block.shape[0], n_heads * head_dim, (n_heads + n_kv_heads) * head_dim
    q = block[:, :q_end].view(n, n_heads, head_dim).transpose(0, 1)
    k = block[:, q_end:k_end].view(n, n_kv_heads, head_dim).transpose(0, 1)
    v = block[:, k_end:].view(n, n_kv_heads, head_dim).transpose(0, 1)
    return q, k, v


def _attend_one(qkv, out, span, cache: RequestCache, layer: int, cos, sin, n_heads: int, n_kv_heads: int,
                head_dim: int) -> None:
    start, n, past = span
    q, k, v = _split_qkv(qkv[start:start + n], n_heads, n_kv_heads, head_dim)
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
    out[start:start + n] = o[0].transpose(0, 1).reshape(n, n_heads * head_dim)


def _decode_together(qkv, out, spans, caches: Sequence[RequestCache], layer: int, cos, sin, n_heads: int,
                     n_kv_heads: int, head_dim: int) -> None:
    """One new token per request: RoPE on all of them at once (the tokens as one sequence), each
    cache written at its own position, then keys / values stacked to the longest length, the
    padding masked out."""
    rows = torch.tensor([start for start, _, _ in spans], device=qkv.device)
    q, k, v = _split_qkv(qkv.index_select(0, rows), n_heads, n_kv_heads, head_dim)  # (H|KV, B, d)
    q, k = apply_rotary_pos_emb(q, k, cos.index_select(0, rows), sin.index_select(0, rows), unsqueeze_dim=0)
    lengths = [past + 1 for _, _, past in spans]
    longest = max(lengths)
    keys = k.new_zeros((len(spans), n_kv_heads, longest, head_dim))
    values = torch.zeros_like(keys)
    for b, ((_, _, past), cache) in enumerate(zip(spans, caches)):
        cache.keys[layer, :, past] = k[:, b]
        cache.values[layer, :, past] = v[:, b]
        keys[b, :, :past + 1] = cache.keys[layer, :, :past + 1]
        values[b, :, :past + 1] = cache.values[layer, :, :past + 1]
    mask = (torch.arange(longest, device=qkv.device)[None, :]
            < torch.tensor(lengths, device=qkv.device)[:, None])[:, None, None, :]  # (B, 1, 1, L)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[:, :, None], keys, values, attn_mask=mask,
                                       scale=head_dim ** -0.5, enable_gqa=n_kv_heads != n_heads)  # (B, H, 1, d)
    out.index_copy_(0, rows, o.reshape(len(spans), n_heads * head_dim))
