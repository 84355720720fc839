"""The reference oracle against a worked example computed by hand (DESIGN.md, "The method, exactly").

Three models, six parameters, numbers exact in binary so every expected value below is exact.
Every step matters: ties at a trim threshold, a zero sign sum that takes the (negative) majority
sign, a parameter where every trimmed value is 0, a mask tie at the lambda threshold, a sign
disagreement with an untrimmed value, and lambda differing per model.
"""

from __future__ import annotations

import pytest
import torch
from method_helpers import assert_bit_identical, one_thread, streaming_merge  # noqa: F401 (fixture)

from mmer_dist.method import MergeSettings
from mmer_dist.method import reconstruct as rec
from mmer_dist.method.reference import (
    reference_merge,
    reference_merged,
    reference_reconstruct,
    reference_text_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = ["img", "aud", "vid"]
BASE = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
TAU = [
    [2.0, -3.0, 0.25, 1.5, -1.0, 0.5],  # |tau| sorted .25 .5 1 1.5 2 3 -> 3rd smallest 1
    [-1.0, 1.0, -2.0, 0.5, -0.5, -0.25],  # .25 .5 .5 1 1 2 -> 0.5 (two entries tie at it)
    [-1.0, -1.0, 0.5, 0.0, -1.5, 0.25],  # 0 .25 .5 1 1 1.5 -> 0.5
]
LAMS = (1.0, 2.0, 0.5)  # 0.5*lam = 0.5, 1, 0.25

# K = 0.5, d = 6: k = 6 - int(3.0) = 3, keep |tau_i| >= 3rd smallest |tau_i|
THRESHOLDS = [1.0, 0.5, 0.5]
TRIMMED = [
    [2.0, -3.0, 0.0, 1.5, -1.0, 0.0],  # -1.0 sits exactly at the threshold: kept
    [-1.0, 1.0, -2.0, 0.5, -0.5, 0.0],  # 0.5 and -0.5 at the threshold: kept
    [-1.0, -1.0, 0.5, 0.0, -1.5, 0.0],
]
# sums: p0 2-1-1 = 0, p1 -3+1-1 = -3, p2 -2+.5 = -1.5, p3 1.5+.5 = 2, p4 -1-.5-1.5 = -3, p5 0
# nonzero signs: one +, three -  -> majority -1, which p0 and p5 (zero sums) take
MAJORITY = -1.0
SIGN = [-1.0, -1.0, -1.0, 1.0, -1.0, -1.0]
# disjoint mean: p0 (-1-1)/2, p1 (-3-1)/2, p2 -2/1, p3 (1.5+.5)/2, p4 (-1-.5-1.5)/3, p5 no entry -> 0
TAU_STAR = [-1.0, -2.0, -2.0, 1.0, -1.0, 0.0]
# masks, tau untrimmed: sign(tau_i) == sign(tau*) and |tau_i| >= 0.5*lam_i*|tau*|, 0 where tau* = 0
MASKS = [
    [0, 1, 0, 1, 1, 0],  # p0 sign +; p2 sign +; |1.5| >= .5; |-1| >= .5
    [1, 0, 1, 0, 0, 0],  # p0 |-1| >= 1*1 (tie, kept); p1 sign +; p2 2 >= 2; p3 .5 < 1; p4 .5 < 1
    [1, 1, 0, 0, 1, 0],  # p2 sign +; p3 tau = 0 has sign 0
]
# theta_hat_i = base + m_i * tau*
THETA_HAT = [
    [1.0, 0.0, 3.0, 5.0, 4.0, 6.0],
    [0.0, 2.0, 1.0, 4.0, 5.0, 6.0],
    [0.0, 0.0, 3.0, 4.0, 4.0, 6.0],
]
# theta_bar = base + mean_i(m_i) * tau*: mean m = 2/3, 2/3, 1/3, 1/3, 2/3, 0
THETA_BAR = [1 - 2 / 3, 2 - 4 / 3, 3 - 2 / 3, 4 + 1 / 3, 5 - 2 / 3, 6.0]
# theta* = base + alpha * tau*, alpha = 0.5
THETA_STAR = [0.5, 1.0, 2.0, 4.5, 4.5, 6.0]


def example(dtype=torch.float32, split=False):
    """The example as one tensor "w" of 6 entries, or split into "a" (4,) and "b" (2,)."""
    base_t = torch.tensor(BASE)
    models_t = [base_t + torch.tensor(t) for t in TAU]
    if not split:
        return {"w": base_t.to(dtype)}, [{"w": m.to(dtype)} for m in models_t]
    cut = lambda t: {"a": t[:4].to(dtype), "b": t[4:].to(dtype)}  # noqa: E731
    return cut(base_t), [cut(m) for m in models_t]


def settings(**kw):
    return MergeSettings(**{"topk": 0.5, "lams": LAMS, "alpha": 0.5, **kw})


def test_hand_example_every_step():
    base, models = example()
    ref = reference_merge(base, models, settings(), IDS)
    assert ref.thresholds["*"] == THRESHOLDS
    assert ref.majority["*"] == MAJORITY
    assert ref.tau_star["w"].tolist() == TAU_STAR
    for i in range(3):
        assert ref.masks[i]["w"].tolist() == [bool(x) for x in MASKS[i]], f"mask of model {i}"
        assert reference_reconstruct(base, ref.tau_star, ref.masks[i])["w"].tolist() == THETA_HAT[i]
        assert rec.reconstruct(base["w"], ref.masks[i]["w"], ref.tau_star["w"]).tolist() == THETA_HAT[i]
    torch.testing.assert_close(reference_text_weights(base, ref.tau_star, ref.masks)["w"],
                               torch.tensor(THETA_BAR), rtol=0, atol=1e-6)
    count = torch.stack([m["w"] for m in ref.masks]).sum(0)
    torch.testing.assert_close(rec.text_weights(base["w"], count, 3, ref.tau_star["w"]),
                               torch.tensor(THETA_BAR), rtol=0, atol=1e-6)
    assert reference_merged(base, ref.tau_star, 0.5)["w"].tolist() == THETA_STAR
    assert rec.merged_weights(base["w"], ref.tau_star["w"], 0.5).tolist() == THETA_STAR


def test_hand_example_trim_and_sign_intermediates():
    """The trimmed vectors and elected signs, through the step functions (not only the oracle)."""
    from mmer_dist.method.elect import decided_by_majority, disjoint_mean, elect_sign, signed_sums
    from mmer_dist.method.trim import trim

    tau = torch.tensor(TAU)
    trimmed = trim(tau, torch.tensor(THRESHOLDS))
    assert trimmed.tolist() == TRIMMED
    sums = signed_sums(trimmed)
    assert sums.total.tolist() == [0.0, -3.0, -1.5, 2.0, -3.0, 0.0]
    assert (sums.positive.tolist(), sums.n_positive.tolist()) == ([2.0, 1.0, 0.5, 2.0, 0.0, 0.0], [1, 1, 1, 2, 0, 0])
    assert (sums.negative.tolist(), sums.n_negative.tolist()) == ([-2.0, -4.0, -2.0, 0.0, -3.0, 0.0], [2, 2, 1, 0, 3, 0])
    sign = elect_sign(sums, MAJORITY)
    assert sign.tolist() == SIGN
    assert disjoint_mean(sums, sign).tolist() == TAU_STAR
    # p0's zero sum is the majority's choice; p5's (every trimmed entry 0) is no one's
    assert decided_by_majority(sums).tolist() == [True, False, False, False, False, False]
    # with a + majority the zero-sum p0 would elect + and take model 0's 2.0 alone
    assert disjoint_mean(sums, elect_sign(sums, 1.0)).tolist()[0] == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows_per_chunk", [1, 2, 6])
def test_hand_example_streaming(dtype, rows_per_chunk):
    """Every value of the example is exact in bf16/fp16, so all dtypes give the hand result."""
    base, models = example(dtype)
    ts, ms, driver, stats = streaming_merge(base, models, settings(), IDS, rows_per_chunk=rows_per_chunk)
    assert ts["w"].tolist() == TAU_STAR
    assert [m["w"].int().tolist() for m in ms] == MASKS
    assert driver.thresholds()["*"].tolist() == THRESHOLDS
    assert driver.majority == {"*": MAJORITY}
    assert stats.mask_counts.tolist() == [sum(m) for m in MASKS]
    assert stats.nonzero == 5 and stats.entries == 6


def test_hand_example_global_scope_spans_tensors():
    """Split over two tensors, global scope selects over all 6 entries: same as one tensor."""
    base, models = example(split=True)
    ref = reference_merge(base, models, settings(), IDS)
    assert ref.thresholds["*"] == THRESHOLDS
    assert (ref.tau_star["a"].tolist() + ref.tau_star["b"].tolist()) == TAU_STAR
    ts, ms, _, _ = streaming_merge(base, models, settings(), IDS, rows_per_chunk=1)
    assert_bit_identical(ts, ms, ref)


def test_hand_example_per_tensor_thresholds():
    """Per-tensor scope: "a" has d=4, k=4-int(2)=2; "b" has d=2, k=2-int(1)=1."""
    base, models = example(split=True)
    ref = reference_merge(base, models, settings(scope="per-tensor"), IDS)
    # a: |tau_1| .25 1.5 2 3 -> 1.5; |tau_2| .5 1 1 2 -> 1; |tau_3| 0 .5 1 1 -> .5
    assert ref.thresholds["a"] == [1.5, 1.0, 0.5]
    # b: |tau_1| .5 1 -> .5; |tau_2| .25 .5 -> .25; |tau_3| .25 1.5 -> .25
    assert ref.thresholds["b"] == [0.5, 0.25, 0.25]
    # trimmed a: m1 [2,-3,0,1.5], m2 [-1,1,-2,0], m3 [-1,-1,0,0]; sums 0, -3, -2, 1.5 -> majority
    # of "a" is -1 (2 vs 1); trimmed b: m1 [-1,.5], m2 [-.5,-.25], m3 [-1.5,.25] -> sums -3, .5:
    # majority of "b" is a tie, so +1
    assert ref.majority == {"a": -1.0, "b": 1.0}
    # a: p0 zero sum -> -1: (-1-1)/2; p1 (-3-1)/2; p2 -2; p3 1.5.  b: p4 -3/3; p5 (.5+.25)/2
    assert ref.tau_star["a"].tolist() == [-1.0, -2.0, -2.0, 1.5]
    assert ref.tau_star["b"].tolist() == [-1.0, 0.375]
    ts, ms, driver, _ = streaming_merge(base, models, settings(scope="per-tensor"), IDS, rows_per_chunk=1)
    assert_bit_identical(ts, ms, ref)
    assert driver.majority == ref.majority


def test_reference_naive_and_ta_by_hand():
    base, models = example()
    ta = reference_merge(base, models, settings(method="ta"), IDS)
    # sum of tau_i: p0 2-1-1, p1 -3+1-1, p2 .25-2+.5, p3 1.5+.5+0, p4 -1-.5-1.5, p5 .5-.25+.25
    assert ta.tau_star["w"].tolist() == [0.0, -3.0, -1.25, 2.0, -3.0, 0.5]
    naive = reference_merge(base, models, settings(method="naive"), IDS)
    torch.testing.assert_close(naive.tau_star["w"], torch.tensor([0.0, -1.0, -1.25 / 3, 2 / 3, -1.0, 0.5 / 3]),
                               rtol=0, atol=1e-7)
