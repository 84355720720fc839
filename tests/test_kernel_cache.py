"""Chunk kernels compiled ahead of time and cached on disk (``mmer_dist.merge.kernel_cache``).

Against eager kernels: tau*, masks, thresholds, majority and the pass sequence bit-identical
(every pass: TIES with float32 noise deltas runs HighPass, LowPass and FinalPass, so all five
kernels are built), with one tensor narrow enough to take the eager path beside fused ones. Then a
new process loads the packages: no compile, no dynamo import, same results.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from method_helpers import assert_bit_identical, bits, streaming_merge

from mmer_dist.merge.kernel_cache import aot_fuser
from mmer_dist.method import MergeSettings
from mmer_dist.method import kernels as kernels_module
from mmer_dist.method.reference import reference_merge

pytestmark = pytest.mark.slow

SETTINGS = MergeSettings(topk=0.6, lams=(0.5, 1.0, 2.0))
IDS = ["img", "aud", "vid"]
# cols 16 and 24 take the compiled kernels (multiples of 8); cols 12 runs eagerly
SHAPES = {"a.weight": (8, 16), "b.weight": (5, 24), "c.weight": (6, 12)}


def models_for():
    g = torch.Generator().manual_seed(4)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = [{k: b + torch.randn(b.shape, generator=g) * 0.01 for k, b in base.items()} for _ in IDS]
    return base, models


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


def test_aot_kernels_equal_eager(cache_dir):
    base, models = models_for()
    ts_e, m_e, drv_e, st_e = streaming_merge(base, models, SETTINGS, IDS, rows_per_chunk=4)
    ts_a, m_a, drv_a, st_a = streaming_merge(base, models, SETTINGS, IDS, rows_per_chunk=4, fuse=aot_fuser(str(cache_dir)))
    assert drv_a.passes_run == drv_e.passes_run == ["HighPass", "LowPass", "FinalPass"]
    assert sorted(p.name.split("-")[0] for p in cache_dir.glob("*.pt2")) == ["high", "masks", "merged", "signs", "tau"]
    for k in base:
        assert torch.equal(bits(ts_a[k]), bits(ts_e[k])), k
        for i in range(len(IDS)):
            assert torch.equal(m_a[i][k], m_e[i][k]), (k, i)
    assert torch.equal(st_a.mask_counts, st_e.mask_counts)
    assert drv_a.majority == drv_e.majority
    assert {g: t.tolist() for g, t in drv_a.thresholds().items()} == {g: t.tolist() for g, t in drv_e.thresholds().items()}
    assert_bit_identical(ts_a, m_a, reference_merge(base, models, SETTINGS, IDS))


def test_the_packages_serve_any_number_of_models(cache_dir, capfd, monkeypatch):
    """Built for three models, the same packages merge 1, 2, 32 and 64 (no compile), and a derived
    merge's final pass (its sign tally and zero-sum map) runs through them too: every result is
    the oracle's, bit for bit. 2**-8-step deltas make exact zero sign sums and threshold ties.
    Masks are made a few models at a time here (as a big chunk's are at any N)."""
    if not list(cache_dir.glob("*.pt2")):
        test_aot_kernels_equal_eager(cache_dir)
    capfd.readouterr()
    monkeypatch.setattr(kernels_module, "MASK_GROUP_ENTRIES", 200)  # 2 to 3 models per call on these chunks
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.pt2")}
    g = torch.Generator().manual_seed(7)
    shapes = {"a.weight": (4, 16), "b.weight": (3, 24)}
    base = {k: torch.randn(s, generator=g).mul(64).round().div(64) for k, s in shapes.items()}
    for n in (1, 2, 32, 64):
        ids = [f"m{i}" for i in range(n)]
        models = [{k: b + torch.randint(-3, 4, b.shape, generator=g) / 256 for k, b in base.items()} for _ in ids]
        settings = MergeSettings(topk=0.7, lams=tuple(0.5 + (i % 4) / 2 for i in range(n)))
        ts, ms, drv, _ = streaming_merge(base, models, settings, ids, rows_per_chunk=2, fuse=aot_fuser(str(cache_dir)))
        ref = reference_merge(base, models, settings, ids)
        assert_bit_identical(ts, ms, ref)
        assert drv.majority == ref.majority
        # the same merge derived with the other majority assumed: the fused final pass counts
        flipped = {**drv.decided_state(), "majority": {gr: -v for gr, v in drv.majority.items()}}
        ts, ms, drv, stats = streaming_merge(base, models, settings, ids, rows_per_chunk=2,
                                             fuse=aot_fuser(str(cache_dir)), assumed=flipped)
        assert_bit_identical(ts, ms, ref)
        assert drv.passes_run == (["FinalPass", "ZeroSumPass"] if stats.decided.per_group()["*"] else ["FinalPass"])
        if n == 32:
            assert drv.passes_run == ["FinalPass", "ZeroSumPass"]
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.pt2")} == before  # nothing built
    assert "compiling" not in capfd.readouterr().err


CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from method_helpers import streaming_merge, bits
from test_kernel_cache import models_for, SETTINGS, IDS
from mmer_dist.merge.kernel_cache import aot_fuser
torch.set_num_threads({threads})  # not the building process's count: partials are sized at run time
base, models = models_for()
ts, ms, drv, st = streaming_merge(base, models, SETTINGS, IDS, rows_per_chunk=4, fuse=aot_fuser({cache!r}))
print(json.dumps({{"dynamo": "torch._dynamo" in sys.modules, "inductor": "torch._inductor" in sys.modules,
                  "tau": {{k: bits(v).tolist() for k, v in ts.items()}}, "counts": st.mask_counts.tolist(),
                  "nonzero": st.nonzero}}))
"""


def test_a_new_process_loads_the_packages_without_compiling(cache_dir):
    if not list(cache_dir.glob("*.pt2")):
        test_aot_kernels_equal_eager(cache_dir)
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.pt2")}
    tests = str(__import__("pathlib").Path(__file__).parent)
    threads = 2 * torch.get_num_threads() + 1
    out = subprocess.run([sys.executable, "-c", CHILD.format(tests=tests, cache=str(cache_dir), threads=threads)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert not got["dynamo"] and not got["inductor"], "loading a cached kernel must not import dynamo/inductor"
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.pt2")} == before  # nothing rebuilt
    assert "compiling" not in out.stderr
    base, models = models_for()
    ts, _, _, st = streaming_merge(base, models, SETTINGS, IDS, rows_per_chunk=4)
    assert got["tau"] == {k: bits(v).tolist() for k, v in ts.items()}
    assert (got["counts"], got["nonzero"]) == (st.mask_counts.tolist(), st.nonzero)


def test_kernels_run_without_holding_the_gil(cache_dir):
    # torch's loader binding holds the GIL for a whole kernel, which kept the merge's reader and
    # writer threads from running beside it; the runner here releases it for the call. A helper
    # thread stamps the clock in a loop: with the GIL held it could only run in the few bytecodes
    # around the call, so its stamps could not cover most of the call's duration.
    import threading
    import time

    from mmer_dist.merge.kernel_cache import GilFreeRunner
    from mmer_dist.method.kernels import ChunkKernels

    kernels = ChunkKernels(SETTINGS, IDS, fuse=aot_fuser(str(cache_dir)))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4096, 4096, generator=g)
    models = base + torch.randn(3, 4096, 4096, generator=g) * 0.01
    args = [models, base, torch.full((3,), 1e-3), torch.tensor(1.0), torch.tensor(0)]
    merged = kernels._fused["merged"]
    merged(*args)  # load (or build) the package
    (runner,) = merged._runners.values()
    assert isinstance(runner, GilFreeRunner)
    stamps, stop = [], threading.Event()

    def helper():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    thread = threading.Thread(target=helper)
    thread.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    runner.run(args)
    t1 = time.perf_counter()
    stop.set()
    thread.join()
    inside = [t for t in stamps if t0 < t < t1]
    assert inside and inside[-1] - inside[0] > 0.5 * (t1 - t0), \
        f"a Python thread ran for {inside[-1] - inside[0] if inside else 0:.4f}s of a {t1 - t0:.4f}s kernel call"
