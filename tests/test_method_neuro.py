"""NeuroMerging: a hand-checked example, streaming == plain per-row SVD, edge cases, bad input.

Tolerance: the implementation decomposes each row through its N x N Gram matrix in float64, the
test oracle through ``torch.linalg.svd`` in float64; both round to float32 at the end, so tau*
agrees to float32 rounding (asserted: |diff| <= 1e-6 * max|tau*| + 1e-12) and masks, which
compare against tau*, agree except where an entry sits within that rounding of its threshold
(asserted: at most 1e-4 of entries).
"""

from __future__ import annotations

import pytest
import torch

from method_helpers import one_thread, random_models, streaming_merge  # noqa: F401
from mmer_dist.errors import InvalidInputError
from mmer_dist.method import MergeSettings
from mmer_dist.method.masks import compute_masks
from mmer_dist.method.neuro import neuro_merge_rows
from mmer_dist.method.reference import reference_merge

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_neuro_rows(trimmed, weight, keep_parallel=False, energy=1.0):
    """The paper's formula, one row at a time, written independently of the implementation."""
    n, rows, cols = trimmed.shape
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        w = weight[r].double()
        t = trimmed[:, r].double()
        ww = float(w @ w)
        p = (t @ w) / ww if ww > 0 else torch.zeros(n, dtype=torch.float64)
        o = t - p[:, None] * w
        u, s, vh = torch.linalg.svd(o, full_matrices=False)
        total, ahead = float((s ** 2).sum()), 0.0
        for j in range(s.numel()):
            keep = float(s[j]) > 1e-12 * float(s[0]) and ahead < energy * total
            ahead += float(s[j]) ** 2
            if not keep:
                continue
            c = o @ vh[j]
            sign = 1.0 if float(c.sum()) >= 0 else -1.0
            agree = torch.sign(c) == sign
            out[r] += c[agree].sum() / max(1, int(agree.sum())) * vh[j]
        if keep_parallel:
            sign = 1.0 if float(p.sum()) >= 0 else -1.0
            agree = torch.sign(p) == sign
            out[r] += p[agree].sum() / max(1, int(agree.sum())) * w
    return out.float()


def close(a, b):
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(((a - b).abs() <= 1e-6 * scale + 1e-12).all())


# -- the hand-checked example -------------------------------------------------------------------
#
# Row 0: w = (1, 0, 0); tau_1 = (2, 3, 0), tau_2 = (-1, -1, 0). Parallel coefficients p = (2, -1);
# orthogonal parts (0, 3, 0) and (0, -1, 0) share one direction e2 with coefficients (3, -1):
# the sum is +2, so only model 1 agrees and c* = 3 -> (0, 3, 0). Keeping the parallel part adds
# the elected mean of p (+1 sum, model 1: 2) times w -> (2, 3, 0).
# Row 1: w = 0, so nothing is parallel. O = [(1, 2, 0), (2, 0, 2)], Gram [[5, 2], [2, 8]] with
# eigenvalues 9 and 4, u1 = (1, 2)/sqrt5, u2 = (2, -1)/sqrt5, singular values 3 and 2.
# c = s_j u_kj: direction 1 (3/sqrt5, 6/sqrt5) both positive, c* = 4.5/sqrt5, v1 = (5, 2, 4)/(3 sqrt5)
# -> 0.3 * (5, 2, 4) = (1.5, 0.6, 1.2). Direction 2 (4/sqrt5, -2/sqrt5), sum > 0, c* = 4/sqrt5,
# v2 = (0, 2, -1)/sqrt5 -> (0, 1.6, -0.8). Sum: (1.5, 2.2, 0.4).
HAND_W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
HAND_TAU = torch.tensor([[[2.0, 3.0, 0.0], [1.0, 2.0, 0.0]], [[-1.0, -1.0, 0.0], [2.0, 0.0, 2.0]]])


def test_hand_checked_two_models_two_rows():
    dropped = neuro_merge_rows(HAND_TAU, HAND_W)
    kept = neuro_merge_rows(HAND_TAU, HAND_W, keep_parallel=True)
    torch.testing.assert_close(dropped, torch.tensor([[0.0, 3.0, 0.0], [1.5, 2.2, 0.4]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(kept, torch.tensor([[2.0, 3.0, 0.0], [1.5, 2.2, 0.4]]), rtol=0, atol=1e-6)


def test_hand_example_through_the_streaming_merge():
    """The same numbers as whole models (K = 1, so nothing is trimmed)."""
    base = {"w": HAND_W}
    models = [{"w": HAND_W + HAND_TAU[0]}, {"w": HAND_W + HAND_TAU[1]}]
    settings = MergeSettings(method="neuro", topk=1.0, lams=(1.0, 1.0))
    tau_star, _, _, _ = streaming_merge(base, models, settings, ["a", "b"], rows_per_chunk=1)
    torch.testing.assert_close(tau_star["w"], torch.tensor([[0.0, 3.0, 0.0], [1.5, 2.2, 0.4]]), rtol=0, atol=1e-6)


# -- streaming against the plain formula ----------------------------------------------------------

CASES = [
    dict(n=3, scope="global", topk=0.8, keep_parallel=False, energy=1.0, rows=2),
    dict(n=4, scope="per-tensor", topk=0.6, keep_parallel=True, energy=1.0, rows=1),
    dict(n=5, scope="global", topk=1.0, keep_parallel=False, energy=0.7, rows=3),
    dict(n=2, scope="per-tensor", topk=0.9, keep_parallel=True, energy=0.5, rows=100),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c['n']}-{c['scope']}-K{c['topk']}-par{c['keep_parallel']}-e{c['energy']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_matches_plain_svd(case, dtype):
    ids = [f"m{i}" for i in range(case["n"])]
    base, models = random_models(case["n"], dtype=dtype, seed=case["n"])
    settings = MergeSettings(method="neuro", topk=case["topk"], scope=case["scope"], lams=tuple([1.0] * case["n"]),
                             neuro_keep_parallel=case["keep_parallel"], neuro_energy=case["energy"])
    tau_star, masks, _, _ = streaming_merge(base, models, settings, ids, rows_per_chunk=case["rows"])
    ref = reference_merge(base, models, settings, ids)
    for name, b in base.items():
        if b.dim() == 2:
            # the trimmed task vectors, from the reference's own thresholds
            group = "*" if case["scope"] == "global" else name
            t = torch.stack([m[name].float() - b.float() for m in models])
            th = torch.tensor(ref.thresholds[group]).reshape(-1, 1, 1)
            trimmed = torch.where(t.abs() >= th, t, torch.zeros(()))
            expected = plain_neuro_rows(trimmed, b.float(), case["keep_parallel"], case["energy"])
        else:
            expected = ref.tau_star[name]  # 1-D weights: TIES elect + disjoint mean
        assert close(tau_star[name], expected), name
        assert close(tau_star[name], ref.tau_star[name]), name
        for i in range(case["n"]):
            differ = (masks[i][name] != ref.masks[i][name]).float().mean()
            assert differ <= 1e-4, (name, i)


def test_masks_are_the_mmer_rule_over_the_neuro_tau_star():
    ids = ["a", "b", "c"]
    base, models = random_models(3, seed=5)
    settings = MergeSettings(method="neuro", lams=(1.0, 0.5, 2.0))
    tau_star, masks, _, _ = streaming_merge(base, models, settings, ids)
    for name, b in base.items():
        tau = torch.stack([m[name].float() - b.float() for m in models])
        expected = compute_masks("mmer", tau, tau_star[name], torch.tensor(settings.lams, dtype=torch.float64))
        for i in range(3):
            assert torch.equal(masks[i][name], expected[i])


# -- edge cases ------------------------------------------------------------------------------------


def test_one_model_keeps_its_orthogonal_part():
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    tau = torch.tensor([[[3.0, 1.0, 2.0, -1.0]]])
    # parallel coefficient <tau, w>/<w, w> = 2: orthogonal rest (1, -1, 2, -1)
    torch.testing.assert_close(neuro_merge_rows(tau, w), torch.tensor([[1.0, -1.0, 2.0, -1.0]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(neuro_merge_rows(tau, w, keep_parallel=True), tau[0], rtol=0, atol=1e-6)


def test_fewer_columns_than_models():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(5, 3, 2, generator=g)
    w = torch.randn(3, 2, generator=g)
    assert close(neuro_merge_rows(tau, w), plain_neuro_rows(tau, w))
    assert close(neuro_merge_rows(tau, w, keep_parallel=True), plain_neuro_rows(tau, w, keep_parallel=True))


def test_all_zero_pretrained_row_has_no_parallel_part():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(3, 2, 6, generator=g)
    w = torch.zeros(2, 6)
    dropped, kept = neuro_merge_rows(tau, w), neuro_merge_rows(tau, w, keep_parallel=True)
    assert torch.equal(dropped, kept)
    assert close(dropped, plain_neuro_rows(tau, w))


def test_identical_task_vectors_give_back_their_orthogonal_part():
    g = torch.Generator().manual_seed(2)
    one = torch.randn(1, 4, 7, generator=g)
    w = torch.randn(4, 7, generator=g)
    merged = neuro_merge_rows(one.repeat(3, 1, 1), w)
    alone = neuro_merge_rows(one, w)
    assert close(merged, alone)
    # the merged rows are orthogonal to w
    assert float((merged.double() * w.double()).sum(-1).abs().max()) < 1e-5


def test_vectors_use_ties_and_only_they_vote_on_the_majority():
    """A 1-D weight where the sign sum is exactly 0 takes the majority of 1-D weights only."""
    base = {"norm": torch.zeros(3), "w": torch.zeros(2, 2)}
    # norm: model sums +2, -2 ... entry 0: +1 and -1 (zero sum); entries 1, 2 negative -> majority -1
    models = [{"norm": torch.tensor([1.0, -1.0, -2.0]), "w": torch.tensor([[5.0, 4.0], [3.0, 2.0]])},
              {"norm": torch.tensor([-1.0, -3.0, -2.0]), "w": torch.tensor([[5.0, 4.0], [3.0, 2.0]])}]
    settings = MergeSettings(method="neuro", topk=1.0, lams=(1.0, 1.0))
    tau_star, _, driver, _ = streaming_merge(base, models, settings, ["a", "b"])
    assert driver.majority["*"] == -1.0  # the 2-D weight's positive entries did not vote
    torch.testing.assert_close(tau_star["norm"], torch.tensor([-1.0, -2.0, -2.0]))
    ref = reference_merge(base, models, settings, ["a", "b"])
    assert ref.majority["*"] == -1.0 and torch.equal(ref.tau_star["norm"], tau_star["norm"])


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.5])
def test_rank_cut_outside_unit_interval_is_refused(energy):
    with pytest.raises(InvalidInputError, match="rank cut"):
        MergeSettings(method="neuro", lams=(1.0,), neuro_energy=energy).validated(["a"])


def test_three_dimensional_weight_is_refused():
    base = {"conv": torch.zeros(2, 3, 4)}
    models = [{"conv": torch.ones(2, 3, 4)}]
    with pytest.raises(InvalidInputError, match="tensor .conv. is 3-D"):
        streaming_merge(base, models, MergeSettings(method="neuro", topk=1.0, lams=(1.0,)), ["a"])


def test_unknown_method_is_refused():
    with pytest.raises(InvalidInputError, match="unknown merge method 'neural'"):
        MergeSettings(method="neural", lams=(1.0,)).validated(["a"])
