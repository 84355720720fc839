"""A majority sign assumed rather than counted (a version derived from another, ``mmer add``):
the final pass counts the sign sums and the entries whose sum is exactly 0, and only where those
entries exist and the counted majority differs does a ``ZeroSumPass`` rewrite them, with values
the final pass kept. Every case must equal the oracle over all the models, bit for bit."""

from __future__ import annotations

import pytest
import torch
from method_helpers import (
    MemoryReader,
    MemoryWriter,
    assert_bit_identical,
    chunk_specs,
    one_thread,  # noqa: F401 (fixture)
    streaming_merge,
)

from mmer_dist.method import MergeDriver, MergeSettings, run_pass
from mmer_dist.method.kernels import ChunkKernels
from mmer_dist.method.reference import reference_merge
from mmer_dist.method.streaming import merge_results

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"a.weight": (6, 16), "b.weight": (5, 24), "norm.weight": (16,)}
IDS = ["m0", "m1", "m2", "new"]
SETTINGS = MergeSettings(topk=0.7, lams=(1.0, 0.5, 2.0, 1.0))


def flipping_models(exact_ties: bool, seed: int = 0):
    """Three served models whose sign sums lean +, and a new one that leans - hard enough to flip
    the majority. ``exact_ties``: deltas are small multiples of 2**-8 (as bf16 deltas are of a
    bf16 step), so some sums are exactly 0 with nonzero entries; else float32 noise, where no sum
    is exactly 0."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).mul(64).round().div(64) for k, s in SHAPES.items()}
    models = []
    for lo, hi, scale in ((-2, 4, 1.0), (-2, 4, 1.0), (-2, 4, 1.0), (-9, 3, 1.5)):
        m = {}
        for k, b in base.items():
            if exact_ties:
                delta = torch.randint(lo, hi, b.shape, generator=g).float() / 256
            else:
                delta = (torch.rand(b.shape, generator=g) * (hi - lo) + lo) * scale / 256
            m[k] = b + delta
        models.append(m)
    return base, models


def derived_state(base, models, settings):
    """What ``mmer add`` starts from: every model's exact thresholds, and the majority sign of the
    served version (the models without the new one)."""
    _, _, served, _ = streaming_merge(base, models[:-1], settings.with_lams(settings.lams[:-1]), IDS[:-1])
    _, _, full, _ = streaming_merge(base, models, settings, IDS)
    state = full.decided_state()
    return {**state, "majority": served.decided_state()["majority"]}, served.majority, full.majority


@pytest.mark.parametrize("exact_ties", [True, False], ids=["zero-sums", "no-zero-sum"])
def test_a_flipped_majority_costs_a_rewrite_only_where_it_decided(exact_ties):
    base, models = flipping_models(exact_ties)
    state, served, counted = derived_state(base, models, SETTINGS)
    assert served != counted  # the new model flips the majority sign
    ts, ms, driver, stats = streaming_merge(base, models, SETTINGS, IDS, assumed=state)
    ref = reference_merge(base, models, SETTINGS, IDS)
    assert_bit_identical(ts, ms, ref)
    assert driver.majority == ref.majority == counted
    decided = stats.decided.per_group()["*"]
    if exact_ties:
        assert decided > 0
        assert driver.passes_run == ["FinalPass", "ZeroSumPass"] and driver.rewritten_entries == decided
    else:
        assert decided == 0
        assert driver.passes_run == ["FinalPass"] and driver.rewritten_entries == 0
    # the set mask bits per model are the oracle's, rewritten entries included
    assert stats.mask_counts.tolist() == [sum(int(m[k].sum()) for k in m) for m in ref.masks]


def test_a_right_guess_is_one_final_pass():
    base, models = flipping_models(exact_ties=True)
    state, _, counted = derived_state(base, models, SETTINGS)
    ts, ms, driver, _ = streaming_merge(base, models, SETTINGS, IDS, assumed={**state, "majority": counted})
    assert driver.passes_run == ["FinalPass"]
    assert_bit_identical(ts, ms, reference_merge(base, models, SETTINGS, IDS))


def test_per_tensor_groups_flip_on_their_own():
    settings = MergeSettings(topk=0.7, scope="per-tensor", lams=SETTINGS.lams)
    base, models = flipping_models(exact_ties=True, seed=1)
    state, served, counted = derived_state(base, models, settings)
    flipped = sorted(g for g in counted if counted[g] != served[g])
    assert flipped  # at least one tensor's majority flips
    ts, ms, driver, stats = streaming_merge(base, models, settings, IDS, assumed=state)
    assert_bit_identical(ts, ms, reference_merge(base, models, settings, IDS))
    if driver.passes_run == ["FinalPass", "ZeroSumPass"]:
        assert set(stats.decided.stale_groups(served)) <= set(flipped)


def test_partials_computed_under_either_sign_add_up():
    """A resumed derived merge: some shards were written under the assumed sign, the rest under the
    counted one (what a restarted merge restores); their partials combine and the rewrite fixes
    only the first."""
    base, models = flipping_models(exact_ties=True)
    state, _, counted = derived_state(base, models, SETTINGS)
    chunks = chunk_specs(base, 2)
    kernels = ChunkKernels(SETTINGS, IDS)
    reader, writer = MemoryReader(base, models), MemoryWriter(base, len(models))
    sizes = {k: v.numel() for k, v in base.items()}
    first = MergeDriver(SETTINGS, sizes, len(models))
    first.restore(state)
    first.check_majority = True
    half = len(chunks) // 2
    early = run_pass(first.next_pass(), chunks[:half], reader, kernels, writer=writer)
    resumed = MergeDriver(SETTINGS, sizes, len(models))
    resumed.restore({**state, "majority": counted})  # the state a finished final pass saved
    late = run_pass(resumed.next_pass(), chunks[half:], reader, kernels, writer=writer)
    resumed.accept(merge_results([late, early]))
    assert early.decided.per_group()["*"] > 0
    assert resumed.stats is None and resumed.next_pass().groups == ("*",)
    resumed.accept(run_pass(resumed.next_pass(), chunks, reader, kernels, writer=writer))
    ts, ms = writer.result()
    ref = reference_merge(base, models, SETTINGS, IDS)
    assert_bit_identical(ts, ms, ref)
    assert resumed.rewritten_entries == early.decided.per_group()["*"]
    assert resumed.stats.mask_counts.tolist() == [sum(int(m[k].sum()) for k in m) for m in ref.masks]


def test_the_counts_survive_a_shard_record():
    """What a resumed merge reads back for its finished shards (JSON beside the staged version)."""
    import json

    from mmer_dist.merge.passes import final_stats_from_record, final_stats_record
    from mmer_dist.method.elect import SignCounts
    from mmer_dist.method.streaming import FinalStats, MajorityDecided

    stats = FinalStats(torch.tensor([3, 4]), 9, 12, SignCounts({"*": torch.tensor([5, 2, 0])}),
                       MajorityDecided({("*", 1.0): 4, ("*", -1.0): 1}, {("*", 1.0): torch.tensor([1, -2])}))
    back = final_stats_from_record(json.loads(json.dumps(final_stats_record(stats, 0.5))))
    assert (back.mask_counts.tolist(), back.nonzero, back.entries) == ([3, 4], 9, 12)
    assert back.signs.groups["*"].tolist() == [5, 2, 0]
    assert back.decided.entries == stats.decided.entries
    assert {k: v.tolist() for k, v in back.decided.changes.items()} == {("*", 1.0): [1, -2]}
    assert back.decided.stale_groups({"*": -1.0}) == ["*"] and back.decided.mask_change({"*": -1.0}, 2).tolist() == [1, -2]
