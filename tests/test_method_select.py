"""Exact radix selection (``select.py``) against ``torch.kthvalue``, on adversarial data.

The oracle is the k-th smallest |tau| by ``torch.kthvalue`` with k = d - int(d*K). The radix path
is run the way the streaming passes run it: partial histograms over arbitrary splits of the
entries, merged in arbitrary order, then ``locate_high`` and (when the rank is not on a bin's
floor value) a low-digit pass over the open bin and ``refine_low``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from method_helpers import one_thread, topk_for_rank  # noqa: F401 (one_thread is a fixture)

from mmer_dist.method import select
from mmer_dist.method.elect import SignCounts
from mmer_dist.method.trim import reference_threshold, trim_rank

pytestmark = pytest.mark.usefixtures("one_thread")

G = "*"


def from_bits(b: torch.Tensor) -> torch.Tensor:
    return b.to(torch.int32).view(torch.float32)


def adversarial(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) float32 task-vector entries (random signs) whose magnitudes stress the selection."""
    g = torch.Generator().manual_seed(seed)
    ri = lambda lo, hi, size=(n, d): torch.randint(lo, hi, size, generator=g, dtype=torch.int64)  # noqa: E731
    if kind == "ties":  # a few distinct values, many exact ties everywhere
        pool = ri(0x3A000000, 0x3F800000, (4,))
        mag = from_bits(pool[ri(0, 4)])
    elif kind == "low-bits":  # one or two high bins; values differ only in the low 16 bits
        hi = torch.tensor([0x3C23, 0x3C24])[ri(0, 2)]
        mag = from_bits((hi << 16) | ri(0, 1 << 16))
    elif kind == "low-bits-ties":  # one bin, few low-bit values: ties inside the open bin
        mag = from_bits((0x3C23 << 16) | (ri(0, 5) * 4099))
    elif kind == "zeros":  # mostly exact zeros, a few values
        mag = torch.where(ri(0, 10) < 8, torch.zeros(n, d), from_bits(ri(0x30000000, 0x3F000000)))
    elif kind == "subnormal":  # bit patterns below the smallest normal float
        mag = from_bits(ri(0, 0x00800000))
    elif kind == "huge-range":  # any finite float32, 1e-45 .. 3.4e38
        mag = from_bits(ri(0, 0x7F800000))
    elif kind == "bf16":  # bf16-representable: low 16 bits zero, ranks land on bin floors
        mag = from_bits(ri(0x3B00, 0x3C80) << 16)
    elif kind == "mostly-floor":  # each bin holds its floor value and a few values above it
        hi = ri(0x3C20, 0x3C24)
        low = torch.where(ri(0, 3) == 0, ri(1, 1 << 16), torch.zeros(n, d, dtype=torch.int64))
        mag = from_bits((hi << 16) | low)
    else:
        raise AssertionError(kind)
    sign = torch.where(ri(0, 2) == 0, -1.0, 1.0)
    return mag * sign


KINDS = ["ties", "low-bits", "low-bits-ties", "zeros", "subnormal", "huge-range", "bf16", "mostly-floor"]


def split(tau: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    """Column pieces of an (n, d) tensor at the given cut points."""
    edges = [0] + sorted(set(c for c in cuts if 0 < c < tau.shape[1])) + [tau.shape[1]]
    return [tau[:, a:b] for a, b in zip(edges, edges[1:])]


def merged(parts: list[select.SparseCounts], order: list[int]) -> select.GroupHistogram:
    h = select.GroupHistogram()
    for i in order:
        h = h.add(G, parts[i])
    return h


def radix_thresholds(pieces: list[torch.Tensor], d: int, topk: float, order: list[int]):
    """Thresholds the streaming way: merged partial histograms, locate_high, low pass if needed."""
    high = merged([select.high_digit_counts(p) for p in pieces], order)
    bounds = select.locate_high(high, {G: d}, topk)
    exact_after_high = bounds.is_exact()
    if not exact_after_high:
        low = merged([select.low_digit_counts(p, bounds.lower[G], bounds.upper[G]) for p in pieces], order)
        bounds = select.refine_low(bounds, low)
    assert bounds.is_exact()
    return bounds.thresholds(G), exact_after_high


def kth_oracle(tau: torch.Tensor, topk: float) -> list[float]:
    return [reference_threshold(row.abs(), topk) for row in tau]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), n=st.integers(1, 3), d=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       rank_frac=st.floats(0.0, 1.0), cuts=st.lists(st.integers(0, 300), max_size=6), data=st.data())
def test_radix_select_equals_kthvalue(kind, n, d, seed, rank_frac, cuts, data):
    tau = adversarial(kind, n, d, seed)
    k = min(d, max(0, round(rank_frac * d)))
    topk = topk_for_rank(d, k)
    pieces = split(tau, cuts)
    order = data.draw(st.permutations(range(len(pieces))))
    got, exact_after_high = radix_thresholds(pieces, d, topk, order)
    event(f"{kind}: {'floor shortcut' if exact_after_high and k else 'low pass' if k else 'k=0'}")
    assert got.tolist() == kth_oracle(tau, topk)


@pytest.mark.parametrize("kind", KINDS)
def test_every_rank(kind):
    """All ranks k = 0..d of one adversarial vector, split into uneven pieces."""
    d = 64
    tau = adversarial(kind, 2, d, seed=5)
    pieces = split(tau, [1, 2, 17, 40, 63])
    high = merged([select.high_digit_counts(p) for p in pieces], [4, 0, 3, 1, 2, 5])
    for k in range(d + 1):
        topk = topk_for_rank(d, k)
        bounds = select.locate_high(high, {G: d}, topk)
        if not bounds.is_exact():
            low = merged([select.low_digit_counts(p, bounds.lower[G], bounds.upper[G]) for p in pieces],
                         [5, 4, 3, 2, 1, 0])
            bounds = select.refine_low(bounds, low)
        got = bounds.thresholds(G)
        want = kth_oracle(tau, topk)
        assert got.tolist() == want, f"rank {k}"
        if k:
            assert want == [float(torch.sort(r.abs()).values[k - 1]) for r in tau]  # the oracle itself


def test_floor_shortcut_exercised_and_exact():
    """Rank on a bin's floor value (low 16 bits zero) is exact after the high digit alone."""
    floor = 1.0  # bits 0x3F800000
    above = from_bits(torch.tensor([0x3F800000 | 0x0123, 0x3F800000 | 0x8000, 0x3F80FFFF])).tolist()
    below = [0.25, 0.5]
    tau = torch.tensor([below + [floor] * 3 + above + [-2.0, 4.0]])  # d = 10
    d = tau.shape[1]
    for k, expect_exact in [(3, True), (4, True), (5, True), (6, False), (7, False), (8, False), (2, True)]:
        topk = topk_for_rank(d, k)
        bounds = select.locate_high(select.GroupHistogram({G: select.high_digit_counts(tau)}), {G: d}, topk)
        assert bounds.is_exact() == expect_exact, k
        got, _ = radix_thresholds([tau[:, :4], tau[:, 4:]], d, topk, [1, 0])
        assert got.tolist() == kth_oracle(tau, topk)
    # ranks 3..5 are the three copies of 1.0, on the floor of bin 0x3F80: threshold 1.0 exactly
    bounds = select.locate_high(select.GroupHistogram({G: select.high_digit_counts(tau)}), {G: d},
                                topk_for_rank(d, 5))
    assert bounds.thresholds(G).tolist() == [1.0]


def test_high_histogram_counts_by_hand():
    tau = torch.tensor([[1.0, -1.0, 0.0, from_bits(torch.tensor(0x3F800001)).item(), 2.0]])
    c = select.high_digit_counts(tau)
    assert c.keys.tolist() == [0, 0x3F80, 0x4000]
    assert c.counts[0, 0].tolist() == [1, 3, 1]  # all entries per high digit
    assert c.counts[1, 0].tolist() == [1, 2, 1]  # those equal to the bin floor (low bits 0)


def test_partial_histograms_merge_associatively():
    tau = adversarial("huge-range", 3, 500, seed=1)
    parts = [select.high_digit_counts(p) for p in split(tau, [10, 11, 200, 333, 499])]
    whole = select.high_digit_counts(tau)

    def same(a, b):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.counts, b.counts)

    left = parts[0]
    for p in parts[1:]:
        left = left.merge(p)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = p.merge(right)
    same(left, whole)
    same(right, whole)
    assert len(parts) == 6
    same(parts[2].merge(parts[0]).merge(parts[4].merge(parts[5]).merge(parts[1])).merge(parts[3]), whole)
    # GroupHistogram over several groups, merged in two orders
    a = select.GroupHistogram({"x": parts[0], "y": parts[1]})
    b = select.GroupHistogram({"y": parts[2]})
    c = select.GroupHistogram({"x": parts[3], "z": parts[4]})
    ab_c, a_bc = a.merge(b).merge(c), a.merge(b.merge(c))
    assert sorted(ab_c.groups) == sorted(a_bc.groups) == ["x", "y", "z"]
    for g in ab_c.groups:
        same(ab_c.groups[g], a_bc.groups[g])
    same(ab_c.groups["x"], parts[0].merge(parts[3]))


def test_stacked_per_model_histograms_equal_the_joint_one():
    """Ingest records (2, M) counts per model; SparseCounts.stack builds the (2, N, M) the driver uses."""
    tau = adversarial("mostly-floor", 4, 300, seed=2)
    per_model = []
    for row in tau:
        c = select.high_digit_counts(row.unsqueeze(0))
        per_model.append(select.SparseCounts(c.keys, c.counts[:, 0]))
    stacked = select.SparseCounts.stack(per_model, dim=1)
    joint = select.high_digit_counts(tau)
    assert torch.equal(stacked.keys, joint.keys) and torch.equal(stacked.counts, joint.counts)


def test_low_digit_counts_only_count_the_open_bin():
    tau = torch.tensor([[1.0, 1.5, from_bits(torch.tensor(0x3F800007)).item(), 0.5, 3.0]])
    lower, upper = torch.tensor([0x3F800000]), torch.tensor([0x3F810000])
    c = select.low_digit_counts(tau, lower, upper)
    assert c.keys.tolist() == [0, 7]  # 1.0 (low 0) and 0x3F800007; 1.5 is 0x3FC00000, outside
    assert c.counts.tolist() == [[1, 1]]


def test_trim_rank_formula():
    assert trim_rank(10, 0.8) == 2
    assert trim_rank(10, 1.0) == 0
    assert trim_rank(7, 0.5) == 4  # 7 - int(3.5)
    assert trim_rank(1, 0.99) == 1
    assert trim_rank(3, 0.001) == 3


# -- SignCounts: is the majority sign decided while some parameters are undecided? ---------------


def brute_force_majorities(pos: int, neg: int, undecided: int) -> set[float]:
    """Every majority the undecided parameters could produce (each ends +, - or a zero sum)."""
    out = set()
    for up in range(undecided + 1):
        for down in range(undecided - up + 1):
            out.add(1.0 if pos + up >= neg + down else -1.0)
    return out


@pytest.mark.parametrize("pos", range(6))
@pytest.mark.parametrize("neg", range(6))
@pytest.mark.parametrize("undecided", range(5))
def test_sign_counts_certainty_brute_force(pos, neg, undecided):
    counts = SignCounts({"g": torch.tensor([pos, neg, undecided])})
    possible = brute_force_majorities(pos, neg, undecided)
    assert counts.is_certain() == (len(possible) == 1)
    if counts.is_certain():
        assert counts.majority() == {"g": possible.pop()}
    else:
        with pytest.raises(RuntimeError):
            counts.majority()


def test_sign_counts_merge_and_groups():
    a = SignCounts({"x": torch.tensor([3, 1, 0]), "y": torch.tensor([0, 2, 1])})
    b = SignCounts({"x": torch.tensor([0, 4, 0]), "z": torch.tensor([1, 1, 0])})
    m = a.merge(b)
    assert {g: v.tolist() for g, v in m.groups.items()} == {"x": [3, 5, 0], "y": [0, 2, 1], "z": [1, 1, 0]}
    assert m.is_certain()  # y: lead -2, one undecided cannot tie it
    assert m.majority() == {"x": -1.0, "y": -1.0, "z": 1.0}


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_parts=st.integers(1, 6), channels=st.integers(1, 3))
def test_sparse_counts_sum_equals_merging_pair_by_pair(seed, n_parts, channels):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(n_parts):
        keys = torch.unique(torch.randint(0, 40, (int(torch.randint(0, 20, (1,), generator=g)),), generator=g))
        parts.append(select.SparseCounts(keys, torch.randint(0, 9, (channels, keys.numel()), generator=g)))
    pairwise = parts[0]
    for p in parts[1:]:
        pairwise = pairwise.merge(p)
    together = select.SparseCounts.sum(parts)
    assert torch.equal(together.keys, pairwise.keys) and torch.equal(together.counts, pairwise.counts)
