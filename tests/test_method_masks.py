"""Mask rules against a per-entry Python loop, and the 1-bit packing (pack/unpack, popcount, density)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from method_helpers import one_thread  # noqa: F401 (a fixture)

from mmer_dist.method import masks as mk

pytestmark = pytest.mark.usefixtures("one_thread")


def loop_mask(rule: str, tau: list[list[float]], tau_star: list[float], lams: list[float]) -> list[list[bool]]:
    """DESIGN.md's formulas, one entry at a time, with float32 products like the contract says."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731

    def sign(x):
        return (x > 0) - (x < 0)

    out = []
    for row, lam in zip(tau, lams):
        r = []
        for t, s in zip(row, tau_star):
            if rule == "tall":
                r.append(bool(f32(abs(t)) >= f32(lam) * (f32(s) - f32(t)).abs()))
                continue
            keep = s != 0
            if rule != "mmer-no-sign":
                keep = keep and sign(t) == sign(s)
            if rule != "mmer-no-magnitude":
                keep = keep and bool(f32(abs(t)) >= f32(0.5 * lam) * f32(abs(s)))
            r.append(keep)
        out.append(r)
    return out


VALUES = [0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 0.25, 3.0, -0.75, 1e-39]


@settings(max_examples=120, deadline=None)
@given(n=st.integers(1, 4), d=st.integers(1, 12), rule=st.sampled_from(mk.MASK_RULES), data=st.data())
def test_mask_rules_equal_the_loop(n, d, rule, data):
    # values from a small set of binary-exact numbers make ties (|tau| == 0.5*lam*|tau*|) common
    tau = [[data.draw(st.sampled_from(VALUES)) for _ in range(d)] for _ in range(n)]
    tau_star = [data.draw(st.sampled_from(VALUES)) for _ in range(d)]
    lams = [data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0, 1e30])) for _ in range(n)]
    lam = torch.tensor(lams, dtype=torch.float64)
    got = mk.compute_masks(rule, torch.tensor(tau), torch.tensor(tau_star), lam)
    assert got.tolist() == loop_mask(rule, tau, tau_star, lams)


def test_mask_rule_ties_by_hand():
    tau = torch.tensor([[1.0, -1.0, 0.5, 0.0], [2.0, 1.0, -1.0, 3.0]])
    tau_star = torch.tensor([2.0, -2.0, 1.0, 0.0])
    lam = torch.tensor([1.0, 2.0], dtype=torch.float64)
    # model 0: |1| >= .5*2 (tie) kept; |-1| >= 1 kept; |.5| >= .5 kept; tau* = 0 -> 0
    # model 1: 2 >= 2 kept; sign + vs -; sign - vs +; tau* = 0 -> 0
    assert mk.compute_masks("mmer", tau, tau_star, lam).int().tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert mk.compute_masks("mmer-no-sign", tau, tau_star, lam).int().tolist() == [[1, 1, 1, 0], [1, 0, 1, 0]]
    assert mk.compute_masks("mmer-no-magnitude", tau, tau_star, lam).int().tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    # tall: |tau| >= lam*|tau* - tau|: m0: 1>=1, 1>=1, .5>=.5, 0>=0; m1: 2>=0, 1>=6 no, 1>=4 no, 3>=6 no
    assert mk.compute_masks("tall", tau, tau_star, lam).int().tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("cols", range(1, 18))
@pytest.mark.parametrize("rows", [1, 3])
def test_pack_unpack_round_trip(cols, rows):
    g = torch.Generator().manual_seed(cols * 31 + rows)
    m = torch.rand(2, rows, cols, generator=g) < 0.5
    packed = mk.pack_bits(m)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, rows, (cols + 7) // 8) == (2, rows, mk.packed_width(cols))
    assert torch.equal(mk.unpack_bits(packed, cols), m)
    # little bit order, zero padding: bit b of byte j is entry 8j + b
    for i in range(2):
        for r in range(rows):
            for j in range(packed.shape[-1]):
                byte = sum(int(m[i, r, 8 * j + b]) << b for b in range(8) if 8 * j + b < cols)
                assert int(packed[i, r, j]) == byte
    assert mk.popcount(packed).tolist() == [int(m[i].sum()) for i in range(2)]
    dens = mk.density(packed, rows * cols)
    assert dens.dtype == torch.float64
    assert dens.tolist() == [int(m[i].sum()) / (rows * cols) for i in range(2)]


def test_set_packed_bits_changes_only_the_entries_given():
    g = torch.Generator().manual_seed(3)
    rows, cols = 5, 21
    m = torch.rand(3, rows, cols, generator=g) < 0.5
    packed = mk.pack_bits(m)
    entries = torch.tensor([0, 1, 7, 8, 20, 22, 23, 104])  # several share a byte; 104 is the last entry
    values = torch.rand(3, entries.numel(), generator=g) < 0.5
    mk.set_packed_bits(packed, cols, entries, values)
    want = m.reshape(3, -1).clone()
    want[:, entries] = values
    assert torch.equal(mk.unpack_bits(packed, cols), want.reshape(3, rows, cols))


def test_pack_all_ones_and_known_bytes():
    ones = torch.ones(1, 11, dtype=torch.bool)
    assert mk.pack_bits(ones).tolist() == [[255, 7]]  # 8 set, then 3 set and 5 padding zeros
    m = torch.tensor([[True, False, False, False, False, False, False, True, True]])
    assert mk.pack_bits(m).tolist() == [[0b10000001, 1]]
    assert mk.popcount(mk.pack_bits(torch.zeros(3, 5, 9, dtype=torch.bool))).tolist() == [0, 0, 0]
    assert mk.density(mk.pack_bits(torch.zeros(1, 0, dtype=torch.bool)), 0).tolist() == [0.0]


def test_half_lambdas_rounds_once():
    # 5e38/2 is a finite float32 value; float32(5e38) would already be inf
    assert mk.half_lambdas([5e38, 1.0, 0.0]).tolist() == [torch.tensor(2.5e38).item(), 0.5, 0.0]
    half = (torch.tensor([5e38], dtype=torch.float64) * 0.5).float()
    assert torch.isfinite(half).all()
