"""The streaming merge (passes over row-block chunks, MergeDriver) against the reference oracle.

Equality is exact: masks bit-identical and tau* bit-identical. DESIGN.md only promises tau*
"within float32 summation-order error", but every path here sums models in model order
(``task_vectors.model_sum``), and the chunking only changes which entries are processed
together, never the arithmetic on one entry, so any difference at all is a bug.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from method_helpers import (  # noqa: F401 (one_thread is a fixture)
    TEST_DEVICE,
    MemoryReader,
    as_2d,
    assert_bit_identical,
    cached_high_histogram,
    chunk_specs,
    one_thread,
    split_merge,
    streaming_merge,
)

from mmer_dist.method import MergeDriver, MergeSettings, run_pass
from mmer_dist.method.kernels import ChunkKernels
from mmer_dist.method.masks import MASK_RULES
from mmer_dist.method.reference import reference_merge
from mmer_dist.method.streaming import FinalPass

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOPKS = [1.0, 0.9, 0.8, 0.5, 0.2, 0.01]
LAMBDAS = [0.0, 0.5, 1.0, 1.7, 2.0, 3.0, 1e6]


@st.composite
def merge_case(draw):
    n = draw(st.integers(1, 6))
    n_tensors = draw(st.integers(1, 3))
    shapes = {}
    for j in range(n_tensors):
        if draw(st.booleans()):
            shapes[f"t{j}.weight"] = (draw(st.integers(1, 6)), draw(st.integers(1, 7)))
        else:
            shapes[f"t{j}.bias"] = (draw(st.integers(1, 9)),)
    dtype = draw(st.sampled_from(DTYPES))
    # quantised deltas (small integers times a step) force exact ties at thresholds and zero sign sums
    quantum = draw(st.sampled_from([None, None, 1.0 / 64, 1.0 / 8]))
    method = draw(st.sampled_from(["ties", "ties", "ties", "ta", "naive"]))
    rule = draw(st.sampled_from(MASK_RULES))
    topk = draw(st.one_of(st.sampled_from(TOPKS), st.floats(0.001, 1.0)))
    lams = tuple(draw(st.sampled_from(LAMBDAS)) for _ in range(n))
    dare = draw(st.sampled_from([0.0, 0.0, 0.3, 0.75]))
    ms = MergeSettings(method=method, topk=topk, scope=draw(st.sampled_from(["global", "per-tensor"])),
                       mask_rule=rule, lams=lams, dare_rate=dare, dare_seed=draw(st.integers(0, 2**31 - 1)))
    # rows per chunk from 1 to the whole tensor, chosen per tensor
    rows = {k: draw(st.integers(1, as_2d(torch.empty(s)).shape[0])) for k, s in shapes.items()}
    return n, shapes, dtype, quantum, ms, rows, draw(st.integers(0, 2**31 - 1))


def make_models(n, shapes, dtype, quantum, seed):
    g = torch.Generator().manual_seed(seed)
    base = {k: (torch.randn(s, generator=g) * 0.5).to(dtype) for k, s in shapes.items()}
    models = []
    for _ in range(n):
        m = {}
        for k, b in base.items():
            if quantum:
                d = torch.randint(-2, 3, b.shape, generator=g).float() * quantum
            else:
                d = torch.randn(b.shape, generator=g) * 0.01
            m[k] = (b.float() + d).to(dtype)
        models.append(m)
    return base, models


def check_against_reference(base, models, ms, ids, ts, masks, driver, stats):
    ref = reference_merge(base, models, ms, ids)
    assert_bit_identical(ts, masks, ref)
    if ms.method == "ties":
        assert driver.majority == ref.majority
        if ms.topk < 1.0:
            assert {g: t.tolist() for g, t in driver.thresholds().items()} == ref.thresholds
    total = sum(v.numel() for v in base.values())
    assert stats.entries == total
    assert stats.nonzero == sum(int((v != 0).sum()) for v in ref.tau_star.values())
    assert stats.mask_counts.tolist() == [sum(int(v.sum()) for v in m.values()) for m in ref.masks]
    return ref


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(merge_case())
def test_streaming_equals_reference(case):
    n, shapes, dtype, quantum, ms, rows, seed = case
    base, models = make_models(n, shapes, dtype, quantum, seed)
    ids = [f"model-{i}" for i in range(n)]
    ts, masks, driver, stats = streaming_merge(base, models, ms, ids, rows_per_chunk=rows)
    event(" > ".join(driver.passes_run))
    check_against_reference(base, models, ms, ids, ts, masks, driver, stats)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(merge_case(), st.integers(1, 4))
def test_split_passes_equal_reference(case, n_workers):
    """Each pass over random splits of the chunks, partials merged in random order."""
    n, shapes, dtype, quantum, ms, rows, seed = case
    base, models = make_models(n, shapes, dtype, quantum, seed)
    ids = [f"m{i}" for i in range(n)]
    rng = torch.Generator().manual_seed(seed)
    ts, masks, driver, stats = split_merge(base, models, ms, ids, rows, n_workers, rng)
    event(" > ".join(driver.passes_run))
    check_against_reference(base, models, ms, ids, ts, masks, driver, stats)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(merge_case())
def test_cached_high_histogram_path(case):
    """A MergeDriver given ingest's per-model histograms skips the HighPass and gets the same result
    (unless DARE is on: the cache holds raw tau_i, so DARE must recompute it)."""
    n, shapes, dtype, quantum, ms, rows, seed = case
    base, models = make_models(n, shapes, dtype, quantum, seed)
    ids = [f"m{i}" for i in range(n)]
    cached = cached_high_histogram(base, models, ms.scope)
    ts, masks, driver, stats = streaming_merge(base, models, ms, ids, rows_per_chunk=rows, cached_high=cached)
    if ms.trims and ms.dare_rate > 0:
        assert "HighPass" in driver.passes_run
    else:
        assert "HighPass" not in driver.passes_run
    check_against_reference(base, models, ms, ids, ts, masks, driver, stats)


def test_dare_ignores_a_cached_histogram():
    """Regression: MergeDriver used the cached (raw tau) histogram under DARE, so thresholds were
    those of the un-dropped task vectors."""
    shapes = {"w": (8, 8)}
    base, models = make_models(3, shapes, torch.bfloat16, None, 7)
    ms = MergeSettings(topk=0.7, lams=(1.0,) * 3, dare_rate=0.5, dare_seed=3)
    ids = ["a", "b", "c"]
    ts, masks, driver, stats = streaming_merge(base, models, ms, ids, rows_per_chunk=3,
                                               cached_high=cached_high_histogram(base, models, "global"))
    ref = check_against_reference(base, models, ms, ids, ts, masks, driver, stats)
    assert ref.thresholds["*"] == [0.0, 0.0, 0.0]  # half the entries dropped to 0, K keeps 70%


def test_many_chunkings_one_model_set():
    """Every rows-per-chunk from 1 to whole, on one set of models, gives one identical result."""
    shapes = {"a.weight": (9, 5), "b.weight": (7, 3), "c.bias": (5,)}
    base, models = make_models(4, shapes, torch.bfloat16, None, 11)
    ids = ["w", "x", "y", "z"]
    for scope in ("global", "per-tensor"):
        ms = MergeSettings(topk=0.6, scope=scope, lams=(0.5, 1.0, 1.5, 2.0))
        ref = reference_merge(base, models, ms, ids)
        for rows in range(1, 10):
            ts, masks, _, _ = streaming_merge(base, models, ms, ids, rows_per_chunk=rows)
            assert_bit_identical(ts, masks, ref)


def test_decided_state_round_trip_resumes_at_the_final_pass():
    """A driver restored from ``decided_state`` (JSON) goes straight to the same FinalPass."""
    base, models = make_models(3, {"a.weight": (6, 5), "b.bias": (7,)}, torch.bfloat16, 1.0 / 64, 5)
    ids = ["a", "b", "c"]
    for ms in (MergeSettings(topk=0.5, scope="per-tensor", lams=(1.0, 2.0, 0.5)),
               MergeSettings(method="ta", lams=(1.0, 1.0, 1.0))):
        ts, masks, driver, stats = streaming_merge(base, models, ms, ids, rows_per_chunk=2)
        state = json.loads(json.dumps(driver.decided_state()))
        fresh = MergeDriver(ms, {k: v.numel() for k, v in base.items()}, 3)
        fresh.restore(state)
        request = fresh.next_pass()
        assert isinstance(request, FinalPass)
        assert request.majority == driver.majority
        assert {g: t.tolist() for g, t in request.thresholds.items()} == \
               {g: t.tolist() for g, t in driver.thresholds().items()}


def test_incomplete_cached_histogram_is_refused():
    """A cached histogram that does not cover every entry (a missing tensor) is an error, not a
    silently wrong threshold."""
    base, models = make_models(2, {"a.weight": (4, 4), "b.weight": (3, 3)}, torch.float32, None, 1)
    partial = cached_high_histogram({"a.weight": base["a.weight"]}, [{"a.weight": m["a.weight"]} for m in models],
                                    "global")
    with pytest.raises(RuntimeError, match="covers"):
        MergeDriver(MergeSettings(topk=0.5, lams=(1.0, 1.0)), {"a.weight": 16, "b.weight": 9}, 2,
                    cached_high=partial)


def test_floor_shortcut_in_the_streaming_passes():
    """bf16 task vectors have zero low 16 bits, so every threshold is a bin floor: exact after the
    HighPass, and the LowPass builds no low-digit histogram. fp32 noise needs the low digit."""
    g = torch.Generator().manual_seed(8)
    shapes = {"a.weight": (6, 7), "b.weight": (5, 4)}
    ids = ["a", "b", "c"]
    for dtype, expect_floor in ((torch.bfloat16, True), (torch.float32, False)):
        base = {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}
        models = [{k: (torch.randn(s, generator=g) * 0.01).to(dtype) for k, s in shapes.items()} for _ in ids]
        ms = MergeSettings(topk=0.55, lams=(1.0,) * 3)
        kernels = ChunkKernels(ms, ids)
        driver = MergeDriver(ms, {k: v.numel() for k, v in base.items()}, 3)
        reader, chunks = MemoryReader(base, models), chunk_specs(base, 2)
        driver.accept(run_pass(driver.next_pass(), chunks, reader, kernels, device=TEST_DEVICE))
        assert driver.passes_run == ["HighPass"]
        assert driver.bounds.is_exact() == expect_floor
        low = run_pass(driver.next_pass(), chunks, reader, kernels, device=TEST_DEVICE)
        assert (low.histogram.groups == {}) == expect_floor
        ts, masks, drv, stats = streaming_merge(base, models, ms, ids, rows_per_chunk=2)
        check_against_reference(base, models, ms, ids, ts, masks, drv, stats)
        assert all(t > 0 for t in drv.thresholds()["*"].tolist())
