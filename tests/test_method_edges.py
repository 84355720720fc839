"""Edge cases of the method, each with the expected values worked out by hand, and each checked on
both the reference oracle and the streaming path (several chunkings; results bit-identical)."""

from __future__ import annotations

import pytest
import torch
from method_helpers import (  # noqa: F401 (one_thread is a fixture)
    assert_bit_identical,
    one_thread,
    random_models,
    split_merge,
    streaming_merge,
)

from mmer_dist.method import MergeSettings
from mmer_dist.method.reference import reference_merge

pytestmark = pytest.mark.usefixtures("one_thread")


def as_models(base: list, taus: list[list], shape=None):
    """base and theta_i = base + tau_i as float32 tensors named "w" (exact for these numbers)."""
    b = torch.tensor(base, dtype=torch.float32)
    shape = shape or b.shape
    return {"w": b.reshape(shape)}, [{"w": (b + torch.tensor(t)).reshape(shape)} for t in taus]


def merge_both(base, models, ms: MergeSettings, ids=None):
    """The reference result, after checking the streaming path against it at every chunking."""
    ids = ids or [f"m{i}" for i in range(len(models))]
    ref = reference_merge(base, models, ms, ids)
    max_rows = max(v.shape[0] if v.dim() > 1 else 1 for v in base.values())
    for rows in sorted({1, 2, max_rows}):
        ts, masks, driver, _ = streaming_merge(base, models, ms, ids, rows_per_chunk=rows)
        assert_bit_identical(ts, masks, ref)
        if ms.method == "ties":
            assert driver.majority == ref.majority
    ts, masks, _, _ = split_merge(base, models, ms, ids, 1, 3, torch.Generator().manual_seed(0))
    assert_bit_identical(ts, masks, ref)
    return ref


def mask_lists(ref, name="w"):
    return [m[name].reshape(-1).int().tolist() for m in ref.masks]


def test_ties_at_threshold_all_kept():
    # d = 6, K = 0.5: k = 3, third smallest |tau| is 1 and five entries equal it: all six kept
    base, models = as_models([0.0] * 6, [[1.0, 1.0, -1.0, 1.0, 2.0, -1.0]])
    ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(1.0,)))
    assert ref.thresholds["*"] == [1.0]
    assert ref.tau_star["w"].tolist() == [1.0, 1.0, -1.0, 1.0, 2.0, -1.0]


def test_topk_one_keeps_everything_without_selection_passes():
    # sums 4, 0, 0 -> majority + (one + vs none -): p1 keeps +2, p2 keeps +0.5
    base, models = as_models([0.0, 0.0, 0.0], [[1.0, -2.0, 0.5], [3.0, 2.0, -0.5]])
    ms = MergeSettings(topk=1.0, lams=(1.0, 1.0))
    ref = merge_both(base, models, ms)
    assert ref.tau_star["w"].tolist() == [2.0, 2.0, 0.5]
    assert ref.majority == {"*": 1.0}
    _, _, driver, _ = streaming_merge(base, models, ms, ["a", "b"])
    assert "HighPass" not in driver.passes_run
    assert driver.thresholds()["*"].tolist() == [0.0, 0.0]


def test_all_zero_task_vector():
    # model b equals the base. a: |tau| .5 1 2 3, K = .5 -> k = 2 -> t = 1: trimmed [1, -2, 3, 0]
    # b: threshold 0, trimmed all 0. Sums 1, -2, 3, 0 -> majority +; p3: no entry -> tau* 0
    base, models = as_models([1.0, 2.0, 3.0, 4.0], [[1.0, -2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(1.0, 1.0)))
    assert ref.thresholds["*"] == [1.0, 0.0]
    assert ref.tau_star["w"].tolist() == [1.0, -2.0, 3.0, 0.0]
    assert mask_lists(ref) == [[1, 1, 1, 0], [0, 0, 0, 0]]  # sign(0) never matches
    # without the sign condition a zero tau_i passes |0| >= 0.5*lam*|tau*| only at lam = 0
    ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(1.0, 0.0), mask_rule="mmer-no-sign"))
    assert mask_lists(ref) == [[1, 1, 1, 0], [1, 1, 1, 0]]
    ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(1.0, 1.0), mask_rule="mmer-no-sign"))
    assert mask_lists(ref)[1] == [0, 0, 0, 0]


def test_parameter_where_every_trimmed_value_is_zero():
    # p0 is the smallest entry of both models: trimmed everywhere -> tau* = 0 -> every mask 0 there,
    # even with lam = 0 and for both ablations
    taus = [[0.125, 2.0, -1.0, 4.0], [-0.25, 1.0, -3.0, 2.0]]
    base, models = as_models([0.0] * 4, taus)
    for rule in ("mmer", "mmer-no-sign", "mmer-no-magnitude"):
        ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(0.0, 0.0), mask_rule=rule))
        assert ref.thresholds["*"] == [1.0, 1.0]
        assert ref.tau_star["w"].tolist() == [0.0, 1.5, -2.0, 3.0]
        assert [m[0] for m in mask_lists(ref)] == [0, 0]
    # TALL has no tau* = 0 clause: |tau_i| >= lam*|0 - tau_i| holds for lam <= 1
    ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(1.0, 1.5), mask_rule="tall"))
    assert [m[0] for m in mask_lists(ref)] == [1, 0]


@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_equal_positive_and_negative_mass_takes_majority(majority):
    # p0: 2 + 1 - 3 = 0 exactly; p1, p2 both carry the majority's sign
    m = majority
    taus = [[2.0, m * 1.0, m * 2.0], [1.0, m * 1.0, m * 1.0], [-3.0, m * 1.0, m * 1.0]]
    base, models = as_models([0.0] * 3, taus)
    ref = merge_both(base, models, MergeSettings(topk=1.0, lams=(1.0,) * 3))
    assert ref.majority == {"*": majority}
    # + majority: mean of 2 and 1; - majority: -3 alone
    assert ref.tau_star["w"][0].item() == (1.5 if majority > 0 else -3.0)


def test_tied_majority_counts_as_plus():
    # sums 1, -1, 0: one + and one -, so the majority is a tie, documented as +1; p2 then keeps 2.0
    base, models = as_models([0.0] * 3, [[1.0, -1.0, 2.0], [0.0, 0.0, -2.0]])
    ref = merge_both(base, models, MergeSettings(topk=1.0, lams=(1.0, 1.0)))
    assert ref.majority == {"*": 1.0}
    assert ref.tau_star["w"].tolist() == [1.0, -1.0, 2.0]


def test_single_model():
    # N = 1: tau* is the trimmed tau; |tau| >= 0.5*lam*|tau| holds for lam <= 2 (tie at 2)
    tau = [0.5, -1.0, 3.0, -0.25, 2.0]
    base, models = as_models([0.0] * 5, [tau])
    for lam, expect in [(1.0, [1, 1, 1, 0, 1]), (2.0, [1, 1, 1, 0, 1]), (2.5, [0, 0, 0, 0, 0])]:
        ref = merge_both(base, models, MergeSettings(topk=0.6, lams=(lam,)))  # k = 5 - 3 = 2 -> t = .5
        assert ref.tau_star["w"].tolist() == [0.5, -1.0, 3.0, 0.0, 2.0]
        assert mask_lists(ref) == [expect]


def test_lambda_zero_is_sign_agreement():
    # the reference example of test_method_reference.py: tau* = [-1, -2, -2, 1, -1, 0]
    from test_method_reference import IDS, TAU, TAU_STAR, example

    base, models = example()
    ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(0.0, 0.0, 0.0)), IDS)
    assert ref.tau_star["w"].tolist() == TAU_STAR
    expect = [[int(t != 0 and s != 0 and (t > 0) == (s > 0)) for t, s in zip(row, TAU_STAR)] for row in TAU]
    assert expect == [[0, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 1, 0]]
    assert mask_lists(ref) == expect


def test_very_large_lambda():
    """lam = 1e30 empties the masks; lam = 5e38 is finite as a float64 but overflows float32:
    0.5*lam = 2.5e38 must be formed before rounding (the rule says 0.5*lam_i is rounded once).

    Regression: the streaming path rounded lam to float32 first (inf), so a mask the reference
    sets was cleared."""
    # a: 1e-39 (subnormal) everywhere, all kept; b: 1.0 at p0, trimmed (its other entries are 100)
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.full((4,), 1e-39)}, {"w": torch.tensor([1.0, 100.0, 100.0, 100.0])}]
    ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(1.0, 1.0)))
    tiny = ref.tau_star["w"][0].item()
    assert tiny == torch.tensor(1e-39).item()  # tau* at p0 is a's value alone
    ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(1e30, 1e30)))
    assert mask_lists(ref) == [[0, 0, 0, 0], [1, 0, 0, 0]]  # 1 >= 5e29 * 1e-39
    ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(5e38, 5e38)))
    assert mask_lists(ref) == [[0, 0, 0, 0], [1, 0, 0, 0]]  # 1 >= 2.5e38 * 1e-39 = 0.25
    ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(1e39, 1e39)))
    assert mask_lists(ref) == [[0, 0, 0, 0], [0, 0, 0, 0]]  # 0.5e39 rounds to inf in float32


def test_two_opposite_sign_models():
    # tau_b = -tau_a: every sign sum is 0, no parameter has a sign, the majority ties -> +1, and
    # tau* keeps the positive one of each pair where kept
    tau = [1.0, -2.0, 0.5, -4.0, 3.0, -0.25]
    base, models = as_models([0.0] * 6, [tau, [-t for t in tau]])
    ref = merge_both(base, models, MergeSettings(topk=0.5, lams=(1.0, 1.0)))  # k = 3 -> t = 1
    assert ref.majority == {"*": 1.0}
    assert ref.tau_star["w"].tolist() == [1.0, 2.0, 0.0, 4.0, 3.0, 0.0]
    assert mask_lists(ref) == [[1, 0, 0, 0, 1, 0], [0, 1, 0, 1, 0, 0]]


def test_per_tensor_scope_with_one_element_tensor():
    # d = 1: k = 1 - int(K) = 1 for K < 1, the threshold is the entry itself and it stays
    base = {"big": torch.zeros(3, 4), "one": torch.zeros(1)}
    models = [{"big": torch.arange(12.0).reshape(3, 4) - 5, "one": torch.tensor([-0.75])},
              {"big": torch.ones(3, 4), "one": torch.tensor([0.5])}]
    for topk in (0.3, 0.999, 1.0):
        ref = merge_both(base, models, MergeSettings(topk=topk, scope="per-tensor", lams=(1.0, 1.0)))
        if topk < 1.0:
            assert ref.thresholds["one"] == [0.75, 0.5]
        # sum -0.25 -> sign - -> tau* = -0.75
        assert ref.tau_star["one"].tolist() == [-0.75]
        assert mask_lists(ref, "one") == [[1], [0]]


def test_negative_zero_entries():
    # theta = -0.0 against a +0.0 base gives tau = -0.0; it must behave as a zero everywhere
    base = {"w": torch.zeros(2, 3)}
    a = torch.tensor([[-0.0, 1.0, -0.0], [2.0, -0.0, -1.0]])
    b = torch.tensor([[-0.0, -0.0, 3.0], [-0.0, -1.0, 1.0]])
    for method in ("ties", "ta", "naive"):
        merge_both(base, [{"w": a}, {"w": b}], MergeSettings(method=method, topk=0.5, lams=(1.0, 1.0)))


def test_sign_pass_runs_when_low_pass_cannot_decide_the_majority():
    """Every magnitude sits in one high-digit bin above its floor, so after the high digit every
    parameter is undecided: the LowPass cannot settle the majority and the driver must run a
    SignPass. p0 has a zero sign sum, so the majority (negative here) changes tau*."""
    g = torch.Generator().manual_seed(3)
    d = 40
    bits = (0x3F80 << 16) | torch.randint(1, 1 << 16, (2, d), generator=g)
    mag = bits.to(torch.int32).view(torch.float32)
    signs = torch.where(torch.rand(2, d, generator=g) < 0.7, -1.0, 1.0)
    tau = mag * signs
    tau[0, 0], tau[1, 0] = 1.9, -1.9  # zero sum, and above every other magnitude: kept by both
    base = {"w": torch.zeros(4, 10)}
    models = [{"w": tau[0].reshape(4, 10)}, {"w": tau[1].reshape(4, 10)}]
    ms = MergeSettings(topk=0.5, lams=(1.0, 1.0))
    ref = merge_both(base, models, ms)
    _, _, driver, _ = streaming_merge(base, models, ms, ["a", "b"], rows_per_chunk=1)
    assert driver.passes_run == ["HighPass", "LowPass", "SignPass", "FinalPass"]
    assert ref.majority == {"*": -1.0}
    assert ref.tau_star["w"][0, 0].item() == pytest.approx(-1.9)


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
@pytest.mark.parametrize("method", ["ties", "naive"])
def test_empty_and_three_dimensional_tensors(scope, method):
    """A 0-element tensor and a (2, 3, 4) tensor (viewed as 2 rows of 12) merge like the others."""
    base, models = random_models(3, shapes={"a": (4, 3), "empty": (0,), "conv": (2, 3, 4)}, seed=4)
    ref = merge_both(base, models, MergeSettings(method=method, scope=scope, topk=0.5, lams=(1.0, 0.5, 2.0)))
    assert ref.tau_star["empty"].numel() == 0
