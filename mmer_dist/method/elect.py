"""TIES sign election and disjoint mean (Yadav et al. 2023; DESIGN.md).

- elect: s = sign(sum_i trimmed tau_i); where that sum is exactly 0, s = the majority sign,
  sign(sum over all parameters of the group of s). If the majority itself is a tie we take +1
  (a documented choice: Yadav's code would leave 0 there).
- disjoint mean: tau* = sum_i (trimmed tau_i where sign(trimmed tau_i) == s)
  / max(1, number of those entries). Zeros never agree with s (s is +-1).
Sums over models run in model order (``task_vectors.model_sum``).

Both steps read one set of sums (``signed_sums``): the whole sum, and the sums and counts of the
positive and of the negative entries. The entries that agree with s are exactly the positive ones
(s = +1) or the negative ones (s = -1), and adding a zero leaves a sum as it is, so the disjoint
sum is the positive (or negative) sum, the same additions in the same order. One sweep over the
models then serves both steps (an (N, ...) "agree" tensor, once materialised, made the fused
kernel ~20x slower), and where the majority decided, the other majority's tau* is at hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from mmer_dist.method.task_vectors import exact_div, model_sum


def majority_sign(positive: int, negative: int) -> float:
    """sign(#positive - #negative) over a group's elected signs; a tie counts as +1."""
    return 1.0 if positive >= negative else -1.0


class SignedSums(NamedTuple):
    """Per parameter, over the models (in model order): the sum of the trimmed tau_i, the sums of
    its positive and of its negative entries, and their counts (float32: exact below 2**24)."""

    total: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    n_positive: torch.Tensor
    n_negative: torch.Tensor


def signed_sums(trimmed: torch.Tensor) -> SignedSums:
    """``SignedSums`` of the (N, ...) trimmed task vectors."""
    zero = torch.zeros((), dtype=trimmed.dtype, device=trimmed.device)
    above, below = trimmed > 0, trimmed < 0
    return SignedSums(model_sum(trimmed), model_sum(torch.where(above, trimmed, zero)),
                      model_sum(torch.where(below, trimmed, zero)),
                      above.to(trimmed.dtype).sum(0), below.to(trimmed.dtype).sum(0))


def elect_sign(sums: SignedSums, majority: float | torch.Tensor) -> torch.Tensor:
    """Elected sign per parameter, +1 or -1 (float32)."""
    s = torch.sign(sums.total)
    return torch.where(s == 0, torch.as_tensor(majority, dtype=s.dtype, device=s.device), s)


def disjoint_mean(sums: SignedSums, sign: torch.Tensor) -> torch.Tensor:
    """Mean over models of the trimmed entries whose sign agrees with the elected one."""
    up = sign > 0
    return exact_div(torch.where(up, sums.positive, sums.negative),
                     torch.clamp(torch.where(up, sums.n_positive, sums.n_negative), min=1.0))


def decided_by_majority(sums: SignedSums) -> torch.Tensor:
    """Bool per parameter: its sum is exactly 0 while some trimmed entry is not, so the majority
    sign chose its tau* (and so its masks). Where every trimmed entry is 0, tau* is 0 under either
    majority and the masks are 0 too: the majority decides nothing there."""
    return (sums.total == 0) & (sums.n_positive + sums.n_negative > 0)


@dataclass(frozen=True)
class SignCounts:
    """Partial counts of elected signs per selection group: (positive, negative, undecided).

    ``undecided`` counts parameters whose trim was not settled when counted (their sign sum
    is unknown); the majority is certain when it holds whichever way they fall.
    """

    groups: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def merge(self, other: SignCounts) -> SignCounts:
        merged = dict(self.groups)
        for g, c in other.groups.items():
            merged[g] = merged[g] + c if g in merged else c
        return SignCounts(merged)

    def is_certain(self) -> bool:
        for c in self.groups.values():
            pos, neg, undecided = (int(v) for v in c)
            lead = pos - neg
            if not (lead - undecided >= 0 or lead + undecided < 0):
                return False
        return True

    def majority(self) -> dict[str, float]:
        if not self.is_certain():
            raise RuntimeError("majority sign asked for before every group's count is decided")
        # certain: either the lead survives every undecided parameter going negative (+1),
        # or it stays negative even if they all go positive (-1)
        return {g: 1.0 if int(c[0]) - int(c[1]) - int(c[2]) >= 0 else -1.0 for g, c in self.groups.items()}
