"""One engine step's batch, as every pipeline stage sees it, and the routing plan built from it.

A step runs any mix of requests: some prefilling their prompt, some decoding one token, in
retention mode (one weight set for every token) or expansion mode (modality tokens through
theta_hat_i, text through the text weights). ``StepBatch`` says, per request, how many new tokens it
brings, how many it has cached, and which weight set each new token runs through (run-length
encoded); it is small and picklable, so stages on other machines receive it beside the hidden
states. Routing is explicit per step: nothing about one request is stored where another could
read it.

Worked example (expansion, text policy mean-mask): a prompt of 9 tokens

    <s> <|user|> <image> x4 what digit ?        -> ids  1  5  -1 -1 -1 -1  30 31 32
                                                   route bar bar hat:img x4  bar bar bar
                                                   embed bar bar  (encoder rows) bar bar bar

runs the four image positions through theta_hat_img (their embeddings come from the image
model's encoder, ``embeds``) and the rest through theta_bar; attention still spans all 9. Each
generated token then runs through ``text`` (theta_bar here) and the LM head of ``head``.

``RoutingPlan`` (built by each stage from a ``StepBatch``) orders the step's tokens by weight set
once, so every Linear and RMSNorm is one plain matmul / multiply per contiguous segment, and
keeps each request's span for attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmer_dist.store.weightsets import WeightSet

RunLengths = tuple[tuple[WeightSet, int], ...]


def run_lengths(keys: Sequence[WeightSet]) -> RunLengths:
    out: list[list] = []
    for k in keys:
        if out and out[-1][0] == k:
            out[-1][1] += 1
        else:
            out.append([k, 1])
    return tuple((k, n) for k, n in out)


def expand(runs: RunLengths) -> list[WeightSet]:
    return [k for k, n in runs for _ in range(n)]


@dataclass(frozen=True)
class RequestSlice:
    """One request's part of a step."""

    request_id: str
    past: int  # tokens of this request already in the KV cache
    route: RunLengths  # weight set of each new token, run-length encoded
    head: WeightSet  # the LM head's weight set
    vocab_model: str | None = None  # adds this model's extra vocabulary rows to the LM head
    reserve: int = 0  # > 0 on the request's first step: allocate a KV cache of this many tokens
    logits: str = "last"  # "last", "all" (every new token; tests) or "none"

    @property
    def n_new(self) -> int:
        return sum(n for _, n in self.route)


@dataclass(frozen=True)
class StepBatch:
    requests: tuple[RequestSlice, ...]
    # first stage only: the new tokens' global ids (-1 where ``embeds`` gives the embedding),
    # the weight set whose embedding rows each id is looked up in, and the given embeddings
    token_ids: torch.Tensor | None = None
    embed_route: RunLengths = ()
    embeds: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return sum(r.n_new for r in self.requests)

    def weight_sets(self) -> list[WeightSet]:
        """Every weight set the step needs (routing, embedding, heads), first use first."""
        keys = [k for r in self.requests for k, _ in r.route]
        keys += [k for k, _ in self.embed_route] + [r.head for r in self.requests]
        return list(dict.fromkeys(keys))


@dataclass(frozen=True)
class RoutingPlan:
    """The step's tokens ordered by weight set (stable), and each request's span.

    Natural order is the step's token order (request after request); sorted order groups tokens by
    weight set so that group ``keys[g]`` is rows ``segments[g]`` of a sorted tensor.
    ``order[i]`` is the natural index of sorted row i; ``inverse`` undoes it. With one weight set
    (every decode step of retention requests) both are None: no permutation at all.
    """

    keys: tuple[WeightSet, ...]
    segments: tuple[tuple[int, int], ...]
    order: torch.Tensor | None
    inverse: torch.Tensor | None
    spans: tuple[tuple[int, int, int], ...]  # per request: (natural start, new tokens, past)
    positions: torch.Tensor  # (T,) position of each natural-order token

    @classmethod
    def build(cls, batch: StepBatch, device: torch.device) -> RoutingPlan:
        route_keys = list(dict.fromkeys(k for r in batch.requests for k, _ in r.route))
        index = {k: i for i, k in enumerate(route_keys)}
        group_ids = [index[k] for r in batch.requests for k, n in r.route for _ in range(n)]
        spans, positions, start = [], [], 0
        for r in batch.requests:
            spans.append((start, r.n_new, r.past))
            positions.extend(range(r.past, r.past + r.n_new))
            start += r.n_new
        pos = torch.tensor(positions, dtype=torch.int64, device=device)
        counts = [0] * len(route_keys)
        for g in group_ids:
            counts[g] += 1
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        segments = tuple((bounds[g], bounds[g + 1]) for g in range(len(route_keys)))
        if len(route_keys) <= 1:
            return cls(tuple(route_keys), segments, None, None, tuple(spans), pos)
        ids = torch.tensor(group_ids, dtype=torch.int64)
        order = torch.argsort(ids, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return cls(tuple(route_keys), segments, order.to(device), inverse.to(device), tuple(spans), pos)

    def to_sorted(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.order is None else x.index_select(0, self.order)

    def to_natural(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.inverse is None else x.index_select(0, self.inverse)
