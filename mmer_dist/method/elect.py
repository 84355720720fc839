"""TIES sign election and disjoint mean (Yadav et al. 2023; DESIGN.md).

- elect: s = sign(sum_i trimmed tau_i); where that sum is exactly 0, s = the majority sign,
  sign(sum over all parameters of the group of s). If the majority itself is a tie we take +1
  (a documented choice: Yadav's code would leave 0 there).
- disjoint mean: tau* = sum_i (trimmed tau_i where sign(trimmed tau_i) == s)
  / max(1, number of those entries). Zeros never agree with s (s is +-1).
Sums over models run in model order (``task_vectors.model_sum``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from mmer_dist.method.task_vectors import exact_div, model_sum


def majority_sign(positive: int, negative: int) -> float:
    """sign(#positive - #negative) over a group's elected signs; a tie counts as +1."""
    return 1.0 if positive >= negative else -1.0


def elect_sign(trimmed: torch.Tensor, majority: float | torch.Tensor) -> torch.Tensor:
    """Elected sign per parameter, +1 or -1 (float32), from the (N, ...) trimmed task vectors."""
    s = torch.sign(model_sum(trimmed))
    return torch.where(s == 0, torch.as_tensor(majority, dtype=s.dtype, device=s.device), s)


def disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over models of the trimmed entries whose sign agrees with the elected one.

    Accumulated model by model in model order (the same additions as ``model_sum``): an
    (N, ...) bool "agree" tensor, once materialised, made the fused kernel ~20x slower.
    """
    zero = torch.zeros((), dtype=trimmed.dtype, device=trimmed.device)
    total = count = None
    for i in range(trimmed.shape[0]):
        agree = torch.sign(trimmed[i]) == sign
        value, hit = torch.where(agree, trimmed[i], zero), agree.to(trimmed.dtype)
        total = value if total is None else total + value
        count = hit if count is None else count + hit
    return exact_div(total, torch.clamp(count, min=1.0))


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
