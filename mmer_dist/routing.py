"""MMER's routed forward (expansion) in plain torch: one forward pass, per-token weights.

Tokens of modality i run through theta_hat_i = theta_pre + m_i * tau*, text tokens through
theta_bar = theta_pre + mean(m) * tau* (DESIGN.md, "Routed forward"; the paper's Sec. 3.3). A
decoder's weights act on each token separately except in attention, which mixes tokens but has no
weights of its own past its projections, so "per-token weights" means: every Linear and RMSNorm
of the decoder picks its weight by the token's group. The text embedding and the LM head use
theta_bar for every token (DESIGN.md); ``text_only`` names them.

The weights are precomputed per group (rebuilding them from base + masks + tau* per step is far
too slow for decode). Tokens are sorted by group once per forward pass (``RoutingPlan``, one host
sync); every Linear then gathers, runs one plain matmul per contiguous group segment and
scatters back. A pass with one group present (decoding one token) is exactly the plain layer.

    routed = route_model(model, [theta_bar, theta_hat_image, theta_hat_audio])   # group 0, 1, 2
    with routed.groups(group_ids):          # (batch, seq) int64, one group per token
        logits = routed.model(input_ids).logits

``route_model`` replaces the model's weight-holding modules in place with routed ones; a module
kind it does not know (anything else holding parameters) is an error, never silently shared.
Serving builds on this: the group states come from ``export``'s reconstructions of a store version.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mmer_dist.errors import InvalidInputError

TEXT_GROUP = 0  # by convention group 0 holds theta_bar (text tokens); groups 1..N the models


def _check(states: Sequence[Mapping[str, torch.Tensor]], key: str) -> None:
    missing = [g for g, s in enumerate(states) if key not in s]
    if missing:
        raise InvalidInputError(f"routed weights: group(s) {missing} have no tensor {key!r}")
    shapes = {tuple(s[key].shape) for s in states}
    if len(shapes) != 1:
        raise InvalidInputError(f"routed weights: {key!r} has different shapes across groups: {sorted(shapes)}")


def _stack(states: Sequence[Mapping[str, torch.Tensor]], key: str, dtype: torch.dtype) -> torch.Tensor:
    _check(states, key)
    return torch.stack([s[key].to(dtype) for s in states])


@dataclass(frozen=True)
class RoutingPlan:
    """How one forward pass's tokens split into groups, computed once per pass (one host sync)
    and shared by every routed module: tokens sorted by group (stable), so each group is one
    contiguous segment and a Linear runs one plain matmul per segment."""

    groups: torch.Tensor  # (batch, seq) int64 on the model's device
    single: int | None  # the one group present, else None
    order: torch.Tensor | None = None  # flat token indices sorted by group
    inverse: torch.Tensor | None = None  # position of each token in ``order``
    segments: tuple[tuple[int, int, int], ...] = ()  # (group, start, stop) in sorted order

    @classmethod
    def build(cls, groups: torch.Tensor, n_groups: int) -> RoutingPlan:
        flat = groups.reshape(-1)
        # one host sync per pass: counts per group, out-of-range ids counted in a last bin
        out_of_range = (flat < 0) | (flat >= n_groups)
        counts = torch.bincount(torch.where(out_of_range, n_groups, flat), minlength=n_groups + 1).tolist()
        if counts[n_groups]:
            bad = flat[out_of_range]
            raise InvalidInputError(f"group ids must lie in [0, {n_groups}); got {bad.unique()[:5].tolist()}")
        present = [g for g in range(n_groups) if counts[g]]
        if len(present) <= 1:
            return cls(groups, present[0] if present else TEXT_GROUP)
        order = torch.argsort(flat, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        bounds = [0]
        for g in range(n_groups):
            bounds.append(bounds[-1] + counts[g])
        return cls(groups, None, order, inverse, tuple((g, bounds[g], bounds[g + 1]) for g in present))


class RoutingContext:
    """The routing plan of the forward pass in flight, shared by every routed module."""

    def __init__(self) -> None:
        self.current: RoutingPlan | None = None

    def plan(self, shape: torch.Size) -> RoutingPlan:
        if self.current is None:
            raise RuntimeError("a routed model ran outside `with routed.groups(group_ids):`")
        if self.current.groups.shape != shape:
            raise InvalidInputError(f"group ids have shape {tuple(self.current.groups.shape)}, "
                                    f"the tokens {tuple(shape)}: one group per token")
        return self.current


class RoutedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, context: RoutingContext):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (G, out, in)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None  # (G, out)
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.context.plan(x.shape[:-1])
        if plan.single is not None:  # one group: the plain layer
            g = plan.single
            return nn.functional.linear(x, self.weight[g], None if self.bias is None else self.bias[g])
        flat = x.reshape(-1, x.shape[-1])[plan.order]
        out = flat.new_empty(flat.shape[0], self.weight.shape[1])
        for g, a, b in plan.segments:
            if self.bias is None:
                torch.mm(flat[a:b], self.weight[g].t(), out=out[a:b])
            else:
                torch.addmm(self.bias[g], flat[a:b], self.weight[g].t(), out=out[a:b])
        return out[plan.inverse].reshape(*x.shape[:-1], -1)


class RoutedEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, padding_idx: int | None, context: RoutingContext):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (G, vocab, dim)
        self.padding_idx = padding_idx
        self.context = context

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        plan = self.context.plan(ids.shape)
        if plan.single is not None:
            return nn.functional.embedding(ids, self.weight[plan.single])
        return self.weight[plan.groups, ids]


class RoutedRMSNorm(nn.Module):
    """Llama's RMSNorm (float32 statistics, weight applied in the input dtype) with a per-token weight."""

    def __init__(self, weight: torch.Tensor, eps: float, context: RoutingContext):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (G, dim)
        self.variance_epsilon = eps
        self.context = context

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        plan = self.context.plan(hidden.shape[:-1])
        dtype = hidden.dtype
        h = hidden.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        weight = self.weight[plan.single] if plan.single is not None else self.weight[plan.groups]
        return weight * h.to(dtype)


class RoutedModel:
    """A model whose weight-holding modules pick their weights per token (see the module doc)."""

    def __init__(self, model: nn.Module, context: RoutingContext, n_groups: int):
        self.model, self.context, self.n_groups = model, context, n_groups
        self.device = next(model.parameters()).device

    @contextlib.contextmanager
    def groups(self, group_ids: torch.Tensor) -> Iterator[None]:
        """Route the forward passes inside this block by ``group_ids`` (batch, seq), one group per
        token; with a KV cache, the ids of the tokens fed in that step."""
        if group_ids.dtype not in (torch.int64, torch.int32):
            raise InvalidInputError(f"group ids must be integers, got {group_ids.dtype}")
        plan = RoutingPlan.build(group_ids.to(self.device, torch.int64), self.n_groups)
        before, self.context.current = self.context.current, plan
        try:
            yield
        finally:
            self.context.current = before

    def __call__(self, group_ids: torch.Tensor, *args, **kwargs):
        with self.groups(group_ids):
            return self.model(*args, **kwargs)


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def embedding_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's text embedding and LM head (HF's input / output embeddings)."""
    wanted = [m for m in (getattr(model, "get_input_embeddings", lambda: None)(),
                          getattr(model, "get_output_embeddings", lambda: None)()) if m is not None]
    return tuple(name for name, m in model.named_modules() if any(m is w for w in wanted))


def route_model(model: nn.Module, group_states: Sequence[Mapping[str, torch.Tensor]],
                text_only: Sequence[str] | None = None) -> RoutedModel:
    """Make ``model`` (a HF Llama-family model, in place) run each token with its group's weights.

    ``group_states[g]`` is a full state dict (the model's own key names) for group g; group 0 is
    the text group (``TEXT_GROUP``, theta_bar). Modules named in ``text_only`` (default: the text
    embedding and LM head) keep group 0's weights for every token. Weights take the model's dtype
    and device.
    """
    if not group_states:
        raise InvalidInputError("route_model needs at least one group of weights")
    text_only = set(embedding_modules(model) if text_only is None else text_only)
    if unknown := sorted(text_only - {name for name, _ in model.named_modules()}):
        raise InvalidInputError(f"route_model: text_only names modules the model does not have: {unknown}")
    context = RoutingContext()
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    # everything is built and checked first, the model changed only once all of it is valid
    swaps: dict[str, nn.Module] = {}
    text_params: dict[int, tuple[nn.Parameter, torch.Tensor, str]] = {}  # by parameter: tied ones once
    used: set[str] = set()

    def stacked(key: str) -> torch.Tensor:
        used.add(key)
        return _stack(group_states, key, dtype).to(device)

    for name, module in model.named_modules():
        if any(name.startswith(r + ".") for r in (*swaps, *text_only)):
            continue
        prefix = f"{name}." if name else ""
        if name in text_only:
            for pname, p in module.named_parameters(recurse=False):
                key = prefix + pname
                _check(group_states, key)
                used.add(key)
                value = group_states[TEXT_GROUP][key].to(dtype=dtype, device=device)
                if id(p) in text_params and not torch.equal(text_params[id(p)][1], value):
                    raise InvalidInputError(f"route_model: {key!r} and {text_params[id(p)][2]!r} are one tied "
                                            f"parameter in the model but differ in the text group's weights")
                text_params[id(p)] = (p, value, key)
        elif isinstance(module, nn.Linear):
            bias = stacked(prefix + "bias") if module.bias is not None else None
            swaps[name] = RoutedLinear(stacked(prefix + "weight"), bias, context)
        elif isinstance(module, nn.Embedding):
            swaps[name] = RoutedEmbedding(stacked(prefix + "weight"), module.padding_idx, context)
        elif _is_rms_norm(module):
            swaps[name] = RoutedRMSNorm(stacked(prefix + "weight"), float(module.variance_epsilon), context)
        elif own := [n for n, _ in module.named_parameters(recurse=False)]:
            raise InvalidInputError(f"route_model: {name or 'the model'} ({type(module).__name__}) holds "
                                    f"parameters {own} but is not a Linear, Embedding or RMSNorm")
    if unused := sorted({k for s in group_states for k in s} - used):
        raise InvalidInputError(f"route_model: tensors not used by the model: {unused[:5]}"
                                + (f" and {len(unused) - 5} more" if len(unused) > 5 else ""))
    for p, value, _ in text_params.values():
        p.data = value
    for name, new in swaps.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return RoutedModel(model, context, len(group_states))


def groups_by_token_range(input_ids: torch.Tensor, ranges: Mapping[int, tuple[int, int]],
                          default: int = TEXT_GROUP) -> torch.Tensor:
    """Group ids from token ids: ``ranges[g] = (start, stop)`` puts ids in [start, stop) in group g
    (e.g. a model's modality token rows); every other token goes to ``default`` (text)."""
    groups = torch.full_like(input_ids, default)
    for g, (start, stop) in ranges.items():
        groups[(input_ids >= start) & (input_ids < stop)] = g
    return groups
