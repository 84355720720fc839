"""Exact top-K thresholds by radix selection on the float32 bit pattern of |tau|.

For finite x >= 0 the int32 bit pattern of x is monotone in x, so the k-th smallest |tau| can be
found digit by digit: a histogram of the high 16 bits locates the bin holding rank k, then a
histogram of the low 16 bits of the entries in that bin pins the exact value. Histograms are
integer counts, so partial histograms from any split of the data (chunks, shards, machines)
merge exactly by addition: ``GroupHistogram.merge`` is associative and commutative, and the
local and Ray backends combine partials with the same code.

The high histogram also counts, per bin, the entries whose low 16 bits are zero (the bin's
smallest value, exactly ``hi << 16``). When the wanted rank falls among those, the threshold is
known without a second pass; for bf16 checkpoints that is the common case, as their deltas are
mostly bf16-representable.

``TrimBounds`` carries the state between passes: per selection group and model, entries with
bits >= upper are kept, bits < lower are dropped, and those in between are undecided until the
low digit is known (lower == upper once exact). Oracle: ``trim.reference_threshold``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from mmer_dist.method.trim import trim_rank

HIGH_SHIFT = 16
LOW_MASK = 0xFFFF
HIGH_BINS = 1 << 15  # the sign bit of |tau| is always 0
LOW_BINS = 1 << 16
NONFINITE_HIGH = 0x7F80  # high digit of +Inf; NaNs lie above it


def magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |tau| (float32), flattened per model: shape (N, n)."""
    return tau.abs().reshape(tau.shape[0], -1).contiguous().view(torch.int32)


def bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


@dataclass(frozen=True)
class SparseCounts:
    """Counts over a sparse set of integer keys: ``keys`` (M,) int64 ascending and unique,
    ``counts`` (..., M) int64 (leading dims are channels x models)."""

    keys: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> SparseCounts:
        """Keep the columns (last dim) where any count is nonzero."""
        occupied = (dense != 0).reshape(-1, dense.shape[-1]).any(0).nonzero().squeeze(1)
        return cls(occupied.to(torch.int64), dense[..., occupied].to(torch.int64))

    def merge(self, other: SparseCounts) -> SparseCounts:
        keys, inverse = torch.unique(torch.cat([self.keys, other.keys]), sorted=True, return_inverse=True)
        out = torch.zeros(self.counts.shape[:-1] + (keys.numel(),), dtype=torch.int64)
        out.index_add_(-1, inverse[: self.keys.numel()], self.counts)
        out.index_add_(-1, inverse[self.keys.numel():], other.counts)
        return SparseCounts(keys, out)

    @staticmethod
    def sum(parts: list[SparseCounts]) -> SparseCounts:
        """The merge of many at once: one sort of all their keys instead of one per pair."""
        if len(parts) == 1:
            return parts[0]
        keys, inverse = torch.unique(torch.cat([p.keys for p in parts]), sorted=True, return_inverse=True)
        out = torch.zeros(parts[0].counts.shape[:-1] + (keys.numel(),), dtype=torch.int64)
        out.index_add_(-1, inverse, torch.cat([p.counts for p in parts], dim=-1))
        return SparseCounts(keys, out)

    @staticmethod
    def stack(parts: list[SparseCounts], dim: int) -> SparseCounts:
        """Stack per-model counts (same leading shape) into a new model axis at ``dim``."""
        keys = torch.unique(torch.cat([p.keys for p in parts]), sorted=True)
        lead = parts[0].counts.shape[:-1]
        out = torch.zeros(lead + (keys.numel(),), dtype=torch.int64).unsqueeze(dim).repeat_interleave(len(parts), dim)
        for i, p in enumerate(parts):
            pos = torch.searchsorted(keys, p.keys)
            out.select(dim, i)[..., pos] = p.counts
        return SparseCounts(keys, out)

    def total(self) -> torch.Tensor:
        return self.counts.sum(-1)


@dataclass(frozen=True)
class GroupHistogram:
    """A partial histogram per selection group (``"*"`` for global scope, else a tensor name)."""

    groups: Mapping[str, SparseCounts] = field(default_factory=dict)

    def merge(self, other: GroupHistogram) -> GroupHistogram:
        merged = dict(self.groups)
        for g, c in other.groups.items():
            merged[g] = merged[g].merge(c) if g in merged else c
        return GroupHistogram(merged)

    def add(self, group: str, counts: SparseCounts) -> GroupHistogram:
        return self.merge(GroupHistogram({group: counts}))


def high_digit_keys(tau: torch.Tensor) -> torch.Tensor:
    """Histogram keys of a chunk, int32 (N, n): model, high digit and whether the low digit is
    nonzero, packed as ((model * HIGH_BINS + high) << 1) | (low != 0). Elementwise, so it fuses
    with the task-vector computation; int32 holds N * 2**16 keys for any N < 2**15."""
    bits = magnitude_bits(tau)
    keys = ((bits >> HIGH_SHIFT) << 1) | ((bits & LOW_MASK) != 0).to(torch.int32)
    return keys + torch.arange(tau.shape[0], dtype=torch.int32, device=tau.device).unsqueeze(1) * (2 * HIGH_BINS)


def dense_high_counts(keys: torch.Tensor) -> torch.Tensor:
    """Dense counts (N * 2 * HIGH_BINS,) of ``high_digit_keys``, on the CPU: they add up across
    chunks, so a long stream of chunks can accumulate them and sparsify once."""
    return torch.bincount(keys.reshape(-1), minlength=keys.shape[0] * 2 * HIGH_BINS).cpu()


def sparse_high_counts(dense: torch.Tensor, n_models: int) -> SparseCounts:
    """High-digit histogram (2, N, M) from dense counts: channel 0 counts all entries, channel 1
    those whose low 16 bits are zero."""
    dense = dense.view(n_models, HIGH_BINS, 2)
    return SparseCounts.from_dense(torch.stack([dense.sum(-1), dense[..., 0]]))


def counts_from_high_keys(keys: torch.Tensor) -> SparseCounts:
    """High-digit histogram (2, N, M) from ``high_digit_keys``."""
    return sparse_high_counts(dense_high_counts(keys), keys.shape[0])


def high_digit_counts(tau: torch.Tensor) -> SparseCounts:
    """High-digit histogram of one chunk of task vectors (N, ...)."""
    return counts_from_high_keys(high_digit_keys(tau))


def low_digit_counts(tau: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> SparseCounts:
    """Low-digit histogram (N, M) of the entries whose bits lie in [lower, upper) per model."""
    n_models = tau.shape[0]
    bits = magnitude_bits(tau)
    lo_b = lower.to(bits.device, torch.int32).unsqueeze(1)
    hi_b = upper.to(bits.device, torch.int32).unsqueeze(1)
    inside = (bits >= lo_b) & (bits < hi_b)
    flat = inside.reshape(-1).nonzero().squeeze(1)
    per_model = bits.shape[1]
    keys = (flat // per_model) * LOW_BINS + (bits.reshape(-1)[flat] & LOW_MASK).to(torch.int64)
    dense = torch.bincount(keys, minlength=n_models * LOW_BINS).cpu().view(n_models, LOW_BINS)
    return SparseCounts.from_dense(dense)


@dataclass(frozen=True)
class TrimBounds:
    """Per group, (N,) int64 bit bounds: keep bits >= upper, drop bits < lower.

    ``rank`` is the wanted rank counted from the bottom of [lower, upper) (1-based), used by
    ``refine_low`` while the bounds are not yet exact.
    """

    lower: Mapping[str, torch.Tensor]
    upper: Mapping[str, torch.Tensor]
    rank: Mapping[str, torch.Tensor]

    def is_exact(self) -> bool:
        return all(bool((self.lower[g] == self.upper[g]).all()) for g in self.lower)

    def thresholds(self, group: str) -> torch.Tensor:
        """float32 (N,) thresholds of a group; only valid once the bounds are exact."""
        if not bool((self.lower[group] == self.upper[group]).all()):
            raise RuntimeError(f"selection group {group!r} is not resolved yet")
        return bits_to_float(self.upper[group])

    @classmethod
    def keep_all(cls, groups: list[str], n_models: int) -> TrimBounds:
        zero = torch.zeros(n_models, dtype=torch.int64)
        return cls({g: zero for g in groups}, {g: zero for g in groups}, {g: zero for g in groups})


def locate_high(hist: GroupHistogram, group_sizes: Mapping[str, int], topk: float) -> TrimBounds:
    """Bounds after the high digit, from a complete high histogram (counts (2, N, M) per group)."""
    lower, upper, rank = {}, {}, {}
    for group, size in group_sizes.items():
        counts = hist.groups[group]
        totals = counts.counts[0].sum(-1)
        if bool((totals != size).any()):
            raise RuntimeError(
                f"magnitude histogram of group {group!r} covers {totals.tolist()} entries, expected {size}"
            )
        k = trim_rank(size, topk)
        n_models = counts.counts.shape[1]
        lo = torch.zeros(n_models, dtype=torch.int64)
        up = torch.zeros(n_models, dtype=torch.int64)
        rk = torch.zeros(n_models, dtype=torch.int64)
        if k > 0:
            for m in range(n_models):
                cum = counts.counts[0, m].cumsum(0)
                j = int(torch.searchsorted(cum, torch.tensor(k, dtype=torch.int64)))
                hi = int(counts.keys[j])
                r = k - (int(cum[j]) - int(counts.counts[0, m, j]))
                lo[m] = hi << HIGH_SHIFT
                if r <= int(counts.counts[1, m, j]):
                    up[m] = hi << HIGH_SHIFT  # rank k sits on the bin's floor value: exact
                else:
                    up[m] = (hi + 1) << HIGH_SHIFT
                    rk[m] = r
        lower[group], upper[group], rank[group] = lo, up, rk
    return TrimBounds(lower, upper, rank)


def refine_low(bounds: TrimBounds, hist: GroupHistogram) -> TrimBounds:
    """Exact bounds from the low-digit histograms of the still-open bins."""
    lower, upper = dict(bounds.lower), dict(bounds.upper)
    for group in bounds.lower:
        open_models = (bounds.lower[group] != bounds.upper[group]).nonzero().squeeze(1).tolist()
        if not open_models:
            continue
        counts = hist.groups[group]
        lo, up = lower[group].clone(), upper[group].clone()
        for m in open_models:
            cum = counts.counts[m].cumsum(0)
            j = int(torch.searchsorted(cum, bounds.rank[group][m]))
            exact = int(lo[m]) | int(counts.keys[j])
            lo[m] = up[m] = exact
        lower[group], upper[group] = lo, up
    return TrimBounds(lower, upper, {g: torch.zeros_like(v) for g, v in bounds.rank.items()})
