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
EMBED, FINAL_NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
# the decoder's matrices, each the row concatenation of these tensors (one matmul per input)
MATRICES = {
    "wqkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "wo": ("self_attn.o_proj.weight",),
    "w_gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "w_down": ("mlp.down_proj.weight",),
}
BIASES = {"bqkv": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
          "bo": ("self_attn.o_proj.bias",), "b_gate_up": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
          "b_down": ("mlp.down_proj.bias",)}
BIAS_NAMES = {n for members in BIASES.values() for n in members}


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


@dataclass
class LayerWeights:
    """One layer of a weight set; a model served mask-native keeps only the vectors (norms and
    biases), its matrices None (``build_vectors``)."""

    attn_norm: torch.Tensor  # (hidden,)
    mlp_norm: torch.Tensor
    wqkv: torch.Tensor | None = None  # ((heads + 2 kv_heads) * head_dim, hidden)
    wo: torch.Tensor | None = None
    w_gate_up: torch.Tensor | None = None  # (2 * intermediate, hidden)
    w_down: torch.Tensor | None = None
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
    if unknown := sorted(own - set(LAYER_TENSORS) - BIAS_NAMES):
        raise InvalidInputError(f"decoder layer {layer} has tensors the Llama block does not use: {unknown}")
    return own & BIAS_NAMES


def _getter(fetch: Callable[[str], torch.Tensor], weight_dtype: torch.dtype, dtype: torch.dtype):
    def get(name: str) -> torch.Tensor:
        t = fetch(name).to(weight_dtype).to(dtype)
        # norms and biases are 1-D (their store view is one row)
        return t.reshape(-1) if "layernorm" in name or name == FINAL_NORM or name.endswith(".bias") else t
    return get


def _vectors(get: Callable[[str], torch.Tensor], layer: int, biases: set[str]) -> dict[str, torch.Tensor | None]:
    """A layer's norms and (fused) biases."""
    p = layer_prefix(layer)
    if 0 < sum(n in biases for n in BIASES["bqkv"]) < 3:
        raise InvalidInputError(f"decoder layer {layer}: q/k/v biases must be all present or all absent")
    out = {field: torch.cat([get(p + n) for n in members]) if all(n in biases for n in members) else None
           for field, members in BIASES.items()}
    return {"attn_norm": get(p + "input_layernorm.weight"), "mlp_norm": get(p + "post_attention_layernorm.weight"),
            **out}


def build_dense(fetch: Callable[[str], torch.Tensor], layers: range, biases: dict[int, set[str]], *,
                embed: bool, head: bool, tied: bool, weight_dtype: torch.dtype, dtype: torch.dtype) -> DenseWeights:
    """``fetch(name)`` gives tensor ``name`` of the weight set in float32 (its 2-D store view, or
    1-D for norms). Each is rounded to ``weight_dtype`` (the checkpoints' dtype: what an export
    writes) and held in ``dtype`` (what the stage computes in), so the served values are the
    exported ones even when the stage computes in float32."""
    get = _getter(fetch, weight_dtype, dtype)
    out = DenseWeights({})
    for layer in layers:
        p = layer_prefix(layer)
        matrices = {field: torch.cat([get(p + n) for n in members]) for field, members in MATRICES.items()}
        out.layers[layer] = LayerWeights(**_vectors(get, layer, biases[layer]), **matrices)
    if embed:
        out.embed = get(EMBED)
    if head:
        out.final_norm = get(FINAL_NORM)
        out.head = (out.embed if out.embed is not None else get(EMBED)) if tied else get(HEAD)
    return out


def build_vectors(fetch: Callable[[str], torch.Tensor], layers: range, biases: dict[int, set[str]], *,
                  head: bool, weight_dtype: torch.dtype, dtype: torch.dtype) -> DenseWeights:
    """Only the vectors of a weight set (norms, biases, the final norm): what the mask-native path
    takes dense; a few thousand parameters per layer, so every model's are kept."""
    get = _getter(fetch, weight_dtype, dtype)
    out = DenseWeights({layer: LayerWeights(**_vectors(get, layer, biases[layer])) for layer in layers})
    if head:
        out.final_norm = get(FINAL_NORM)
    return out
