"""One weight set of a stage as dense serving tensors, laid out for the decoder's matmuls.

A stage's share of a weight set (``base``, ``bar``, ``hat:<id>``, ...; see
``mmer_dist.store.weightsets``) is built tensor by tensor from a function giving the float32
weight (``compose`` on device-resident blocks), cast to the serving dtype, and fused where the
decoder multiplies one input by several weights: q/k/v into one matrix, gate/up into one. Fusing
concatenates rows, so every served entry is still the exact cast of its float32 weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from mmer_dist.errors import InvalidInputError

LAYER_TENSORS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
LAYER_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias",
                "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")
EMBED, FINAL_NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # (hidden,)
    wqkv: torch.Tensor  # ((heads + 2 kv_heads) * head_dim, hidden)
    wo: torch.Tensor
    mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor  # (2 * intermediate, hidden)
    w_down: torch.Tensor
    bqkv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    b_gate_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for f in fields(self) if (t := getattr(self, f.name)) is not None]


@dataclass
class DenseWeights:
    """A weight set for one stage: its decoder layers, and the embedding / final norm / LM head
    rows of the base vocabulary when the stage has them (tied: ``head is embed``)."""

    layers: dict[int, LayerWeights]
    embed: torch.Tensor | None = None
    final_norm: torch.Tensor | None = None
    head: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in [*(t for lw in self.layers.values() for t in lw.tensors()), self.embed, self.final_norm, self.head]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total


def check_layer_tensors(names: set[str], layer: int) -> set[str]:
    """The bias names present for ``layer``; refuses a block the decoder does not run."""
    prefix = layer_prefix(layer)
    own = {n[len(prefix):] for n in names if n.startswith(prefix)}
    if missing := sorted(set(LAYER_TENSORS) - own):
        raise InvalidInputError(f"decoder layer {layer} lacks tensors {missing}")
    if unknown := sorted(own - set(LAYER_TENSORS) - set(LAYER_BIASES)):
        raise InvalidInputError(f"decoder layer {layer} has tensors the Llama block does not use: {unknown}")
    return own & set(LAYER_BIASES)


def build_dense(fetch: Callable[[str], torch.Tensor], layers: range, biases: dict[int, set[str]], *,
                embed: bool, head: bool, tied: bool, weight_dtype: torch.dtype, dtype: torch.dtype) -> DenseWeights:
    """``fetch(name)`` gives tensor ``name`` of the weight set in float32 (its 2-D store view, or
    1-D for norms). Each is rounded to ``weight_dtype`` (the checkpoints' dtype: what an export
    writes) and held in ``dtype`` (what the stage computes in), so the served values are the
    exported ones even when the stage computes in float32."""

    def get(name: str) -> torch.Tensor:
        t = fetch(name).to(weight_dtype).to(dtype)
        return t.reshape(-1) if "layernorm" in name or name == FINAL_NORM else t

    def cat(names: list[str]) -> torch.Tensor:
        return torch.cat([get(n) for n in names])

    out = DenseWeights({})
    for layer in layers:
        p, b = layer_prefix(layer), biases[layer]
        bias = lambda *ns: cat([p + n for n in ns]) if all(n in b for n in ns) else None  # noqa: E731
        if any(n in b for n in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")) \
                and bias("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias") is None:
            raise InvalidInputError(f"decoder layer {layer}: q/k/v biases must be all present or all absent")
        out.layers[layer] = LayerWeights(
            attn_norm=get(p + "input_layernorm.weight"),
            wqkv=cat([p + f"self_attn.{x}_proj.weight" for x in "qkv"]),
            wo=get(p + "self_attn.o_proj.weight"),
            mlp_norm=get(p + "post_attention_layernorm.weight"),
            w_gate_up=cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
            w_down=get(p + "mlp.down_proj.weight"),
            bqkv=bias("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
            bo=bias("self_attn.o_proj.bias"),
            b_gate_up=bias("mlp.gate_proj.bias", "mlp.up_proj.bias"),
            b_down=bias("mlp.down_proj.bias"))
    if embed:
        out.embed = get(EMBED)
    if head:
        out.final_norm = get(FINAL_NORM)
        out.head = (out.embed if out.embed is not None else get(EMBED)) if tied else get(HEAD)
    return out
