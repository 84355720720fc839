"""TIES trim: keep the top-K fraction of each task vector's entries by magnitude.

Semantics (Yadav et al.'s reference, DESIGN.md): over d entries, k = d - int(d*K); the threshold
t is the k-th smallest |tau| (1-based); entries with |tau| >= t are kept, ties at t included.
k = 0 (K = 1) keeps everything (t = 0). Scope ``global`` takes d over all LLM parameters of a
model, ``per-tensor`` within each tensor. The exact streaming selection lives in ``select.py``;
``reference_threshold`` here is the whole-vector oracle it is tested against.
"""

from __future__ import annotations

import torch

SCOPES = ("global", "per-tensor")
GLOBAL_GROUP = "*"


def check_scope(scope: str) -> None:
    from mmer_dist.errors import InvalidInputError

    if scope not in SCOPES:
        raise InvalidInputError(f"unknown trim scope {scope!r}; expected one of {', '.join(SCOPES)}")


def selection_group(tensor: str, scope: str) -> str:
    """The set of entries one threshold is chosen over: the whole model, or one tensor."""
    return GLOBAL_GROUP if scope == "global" else tensor


def trim_rank(d: int, topk: float) -> int:
    """k = d - int(d*K): the 1-based rank of the threshold among the d magnitudes (0: keep all)."""
    return d - int(d * topk)


def reference_threshold(abs_values: torch.Tensor, topk: float) -> float:
    """Oracle: the k-th smallest magnitude of a flat vector, by ``torch.kthvalue``."""
    flat = abs_values.reshape(-1).float()
    k = trim_rank(flat.numel(), topk)
    if k == 0:
        return 0.0
    return float(torch.kthvalue(flat, k).values)


def trim(tau: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero the entries of each model's tau below its threshold.

    ``tau`` is (N, ...) float32, ``thresholds`` (N,) float32; keeps |tau| >= t (ties kept).
    """
    t = thresholds.reshape((-1,) + (1,) * (tau.dim() - 1))
    return torch.where(tau.abs() >= t, tau, torch.zeros((), dtype=tau.dtype, device=tau.device))
