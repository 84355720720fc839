"""Versions of a live system through the real CLI: ``mmer add`` / ``remove`` equal from-scratch
merges bit for bit, the served version is explicit (promote, rollback, --no-promote), gc keeps
what is served or leased, and a failing add leaves the served version as it was."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ingest_args
from ray_helpers import version_arrays
from store_helpers import run_cli, status_json

from mmer_dist.demo import tiny_models
from mmer_dist.merge.engine import MergeRequest, merge
from mmer_dist.merge.incremental import known_state
from mmer_dist.merge.local import LocalBackend
from mmer_dist.store.serving import ServerLease
from mmer_dist.store.store import Store

FIRST = ("llava-hf", "generic")  # the merged store's first version; then video-llava-hf (3 extra rows) joins


def same_arrays(url_a: str, version_a: int, url_b: str, version_b: int) -> None:
    a, b = version_arrays(url_a, version_a), version_arrays(url_b, version_b)
    assert a.keys() == b.keys()
    differing = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differing, f"{len(differing)} arrays differ, e.g. {differing[:3]}"


@pytest.fixture()
def two(tmp_path, stores, ckpts):
    """Base + the four fine-tunes ingested; version 1 over llava-hf and generic, served."""
    store = stores.fresh(tmp_path / "store", models=True)
    run_cli("merge", "--store", store, "--models", *FIRST, "--lam", "generic=0.7", "--quiet", "--device", "cpu")
    return store


def scratch(two, tmp_path, models, lams=None):
    """The same store merged from scratch over ``models`` (in that order)."""
    ref = shutil.copytree(two, tmp_path / "scratch")
    args = ["merge", "--store", ref, "--models", *models, "--quiet", "--device", "cpu"]
    for m, v in (lams or {}).items():
        args += ["--lam", f"{m}={v}"]
    run_cli(*args)
    return str(ref)


def test_add_equals_a_from_scratch_merge_and_reads_one_model_for_thresholds(tmp_path, stores, ckpts):
    store = stores.fresh(tmp_path / "store", models=False)
    for fmt in FIRST:
        run_cli(*ingest_args(store, fmt, ckpts.finetuned(fmt), fmt))
    run_cli("merge", "--store", store, "--lam", "generic=0.7", "--quiet", "--device", "cpu")
    ref = shutil.copytree(store, tmp_path / "ref")
    out = run_cli("add", "--store", store, "--model", "video-llava-hf", "--modality", "video", "--path",
                  ckpts.finetuned("video-llava-hf"), "--lam", "1.3", "--task", "clips", "--quiet", "--device", "cpu").out
    assert "reused the served version's thresholds" in out
    run_cli(*ingest_args(ref, "video-llava-hf", ckpts.finetuned("video-llava-hf"), "video-llava-hf"))
    run_cli("merge", "--store", ref, "--models", *FIRST, "video-llava-hf", "--lam", "generic=0.7",
            "--lam", "video-llava-hf=1.3", "--quiet", "--device", "cpu")
    same_arrays(store, 2, str(ref), 2)
    status = status_json(store)
    v2 = next(v for v in status["versions"] if v["version"] == 2)
    assert v2["models"] == [*FIRST, "video-llava-hf"] and v2["lams"] == [1.0, 0.7, 1.3]
    assert v2["passes"] == ["FinalPass"]  # thresholds and majority came from version 1
    assert next(m for m in status["models"] if m["id"] == "video-llava-hf")["task"] == "clips"
    assert status["serving"]["version"] == 2


def test_remove_equals_a_from_scratch_merge_of_the_rest(two, tmp_path):
    run_cli("merge", "--store", two, "--models", *FIRST, "llava", "--lam", "generic=0.7", "--quiet", "--device", "cpu")
    ref = scratch(two, tmp_path, ["llava-hf", "llava"])
    out = run_cli("remove", "--store", two, "--model", "generic", "--quiet", "--device", "cpu").out
    assert "reused" in out
    same_arrays(two, 3, ref, 3)
    status = status_json(two)
    assert next(m for m in status["models"] if m["id"] == "generic")["removed_at"]
    assert status["serving"]["version"] == 3
    with pytest.raises(AssertionError, match="not in the served version"):
        run_cli("remove", "--store", two, "--model", "generic", "--quiet")


def test_a_wrong_majority_guess_is_caught_and_its_zero_sums_rewritten(two, tmp_path):
    """The final pass checks the majority sign it was given: flipped on purpose, the entries it
    decided (sign sums of exactly 0, common with bf16 deltas) are rewritten from the values the
    final pass kept, without reading a model again, and the result equals counting it."""
    store = Store.open(str(two))
    catalog = store.catalog()
    served = catalog.version(1)

    def flipped(current, plan):
        state = known_state(store, served, current, plan, {})
        return {**state, "majority": {g: -v for g, v in state["majority"].items()}}

    ref = scratch(two, tmp_path, list(FIRST), {"generic": 0.7})
    record = merge(str(two), MergeRequest(models=FIRST, lam={"generic": 0.7}), LocalBackend(), progress=False,
                   known=flipped)
    details, scratch_details = json.loads(record.details), status_json(ref)["versions"][1]["details"]
    assert details["decided_by_majority"]["*"] > 0
    assert record.passes == ["FinalPass", "ZeroSumPass"]
    assert details["majority_rewritten"] == details["decided_by_majority"]["*"]
    assert details["majority"] == scratch_details["majority"]
    same_arrays(str(two), record.version, ref, 2)
    assert not list((two / "versions").rglob("_staging"))  # the kept values went with the staging


def test_the_served_version_is_explicit(two):
    run_cli("merge", "--store", two, "--models", "llava-hf", "--quiet", "--device", "cpu", "--no-promote")
    status = status_json(two)
    assert [v["version"] for v in status["versions"]] == [1, 2] and status["serving"]["version"] == 1
    run_cli("promote", "--store", two, "--version", "2")
    assert status_json(two)["serving"] == {"version": 2, "stack": [1, 2]}
    r = run_cli("promote", "--store", two, "--version", "9", ok=False)
    assert "no version 9" in r.err
    assert "version 1 is served again" in run_cli("rollback", "--store", two).out
    assert status_json(two)["serving"]["version"] == 1
    r = run_cli("rollback", "--store", two, ok=False)
    assert "no earlier served version" in r.err
    assert "serving" in run_cli("status", "--store", two).out.lower()


def test_gc_keeps_the_served_and_the_leased_versions(two, ckpts):
    for models in (["llava-hf"], ["generic"], ["llava-hf", "generic"]):
        run_cli("merge", "--store", two, "--models", *models, "--quiet", "--device", "cpu", "--no-promote")
    run_cli("promote", "--store", two, "--version", "2")
    lease = ServerLease(str(two), ttl=60)
    lease.hold([3])
    try:
        out = run_cli("gc", "--store", two, "--keep", "1").out
    finally:
        lease.release()
    versions = [v["version"] for v in status_json(two)["versions"]]
    assert versions == [2, 3, 4], out  # 4 newest, 2 served, 3 leased; 1 retired
    assert not Store.open(str(two)).exists_path("versions/000001")
    assert Store.open(str(two)).exists_path("versions/000003")
    run_cli("gc", "--store", two, "--keep", "1")  # the lease is gone now
    assert [v["version"] for v in status_json(two)["versions"]] == [2, 4]
    r = run_cli("gc", "--store", two, "--keep", "0", ok=False)
    assert "--keep must be at least 1" in r.err


def _truncated(ckpts, tmp_path):
    broken = shutil.copytree(ckpts.finetuned("llava-hf"), tmp_path / "broken")
    weights = sorted(broken.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:200])
    return broken


def _other_architecture(ckpts, tmp_path):
    base = tiny_models.save_base(tmp_path / "other-base", dtype=torch.bfloat16, seed=5, num_hidden_layers=3)
    return tiny_models.save_finetuned(base, tmp_path / "other", "llava-hf", dtype=torch.bfloat16, seed=6)


@pytest.mark.parametrize("make, words", [(_truncated, ("broken", "safetensors")),
                                         (_other_architecture, ("layers", "shape", "architecture"))],
                         ids=["truncated", "other-architecture"])
def test_a_failing_add_leaves_the_served_version_untouched(two, tmp_path, ckpts, make, words):
    before = status_json(two)
    path = make(ckpts, tmp_path)
    r = run_cli("add", "--store", two, "--model", "newbie", "--modality", "image", "--path", path, "--quiet",
                ok=False)
    assert r.rc == 2 and "Traceback" not in r.err and any(w in r.err for w in words), r.err
    after = status_json(two)
    assert after["serving"] == before["serving"] and after["versions"] == before["versions"]
    assert [m["id"] for m in after["models"]] == [m["id"] for m in before["models"]]
