"""SIGKILL in the middle of ``mmer ingest`` and ``mmer merge`` (real subprocesses).

The store is built from a deeper tiny base (8 layers) with 256-entry chunks, so one model is a few
hundred chunks and each command runs for seconds: long enough to be killed mid-way. After each
kill: the store opens, the last good version is still the latest and exports exactly as before,
the killed command's model or version is invisible, and re-running the same command completes
(a merge resumes from the shards it had finished) with the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import copy_store
from store_helpers import (
    StoreState,
    assert_state_dicts_identical,
    load_dir,
    mmer_subprocess,
    run_cli,
    status_json,
)

from mmer_dist.demo import tiny_models
from mmer_dist.store import layout
from mmer_dist.store.store import Store

pytestmark = pytest.mark.slow

LAYERS, CHUNK_ELEMS = 8, 256
MERGE_ARGS = ("--quiet", "--no-compile", "--device", "cpu", "--workers", "4")


def _ingest(store, model_id, path):
    return ("ingest", "--store", store, "--model", model_id, "--path", path, "--modality", "image", "--quiet")


@pytest.fixture(scope="module")
def big(ckpts, tmp_path_factory):
    """Checkpoints (base, A, B) and a store with base + A merged as version 1."""
    base = ckpts.custom("big-base", lambda p: tiny_models.save_base(p, dtype=torch.bfloat16, num_hidden_layers=LAYERS))
    a = ckpts.custom("big-a", lambda p: tiny_models.save_finetuned(base, p, "llava", dtype=torch.bfloat16, seed=21))
    b = ckpts.custom("big-b", lambda p: tiny_models.save_finetuned(base, p, "llava", dtype=torch.bfloat16, seed=22))
    root = tmp_path_factory.mktemp("big")
    store = root / "store-a"
    run_cli("ingest", "--store", store, "--base", base, "--chunk-elems", CHUNK_ELEMS, "--quiet")
    run_cli(*_ingest(store, "a", a))
    run_cli("merge", "--store", store, "--quiet", "--no-compile")
    n_chunks = sum(-(-t.rows // t.rows_per_chunk) for t in Store.open(str(store)).catalog().tensors)
    assert n_chunks > 300  # the commands below are long enough to be killed mid-way
    return type("Big", (), dict(root=root, base=base, a=a, b=b, store_a=store))


@pytest.fixture(scope="module")
def store_ab(big):
    """base + A + B, version 1 (A only) published: the starting point of the merge kills."""
    store = copy_store(big.store_a, big.root / "store-ab")
    run_cli(*_ingest(store, "b", big.b))
    return store


@pytest.fixture(scope="module")
def uninterrupted(big, store_ab):
    """The same merge as the killed ones below, run start to finish on a copy."""
    store = copy_store(store_ab, big.root / "store-ab-uninterrupted")
    run_cli("merge", "--store", store, *MERGE_ARGS)
    return store


def _wait_for(proc, condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def _kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _exports(store: Path, dest: Path, model_id: str = "a") -> dict[str, dict[str, torch.Tensor]]:
    """The latest version's reconstructed model and merged weights, as a reader sees them now."""
    run_cli("export", "model", "--store", store, "--model", model_id, "--out", dest / "model", "--quiet")
    run_cli("export", "merged", "--store", store, "--out", dest / "merged", "--quiet")
    return {"model": load_dir(dest / "model"), "merged": load_dir(dest / "merged")}


def _arrays_equal(store_x: Path, store_y: Path, version: int, model_ids) -> None:
    """Every tau* and mask chunk of ``version`` identical in two stores."""
    sx, sy = Store.open(str(store_x)), Store.open(str(store_y))
    for t in sx.catalog().tensors:
        paths = [f"{layout.version_tau_star(version)}/{t.name}"]
        paths += [f"{layout.version_masks(version)}/{t.name}"]
        for p in paths:
            x, y = sx.read(p), sy.read(p)
            assert x.dtype == y.dtype and torch.equal(x, y), p


def test_killed_ingest_leaves_the_store_as_it_was(big, tmp_path):
    store = copy_store(big.store_a, tmp_path / "store")
    before = StoreState.capture(store)
    exports_before = _exports(store, tmp_path / "before")

    proc = mmer_subprocess(*_ingest(store, "b", big.b))
    llm = store / "models" / "b" / "llm"
    _wait_for(proc, lambda: llm.is_dir() and len(list(llm.glob("*/zarr.json"))) >= 3, "b's arrays appear")
    _kill(proc)

    # the store opens; status does not list b; the catalog is the same snapshot
    status = status_json(store)
    assert [m["id"] for m in status["models"]] == ["a"]
    after = StoreState.capture(store)
    assert (after.seq, after.models, after.versions) == (before.seq, before.models, before.versions)
    assert any(f.startswith("models/b/") for f in after.files)  # it was killed mid-way, leaving invisible data
    n_tensors = status["tensors"]
    assert len(list(llm.glob("*/zarr.json"))) < n_tensors
    # the last good version is intact
    exports_after = _exports(store, tmp_path / "after")
    for kind in exports_before:
        assert_state_dicts_identical(exports_after[kind], exports_before[kind], f"{kind} after the kill")

    # the same ingest, re-run, completes, and b round-trips
    run_cli(*_ingest(store, "b", big.b))
    assert [m["id"] for m in status_json(store)["models"]] == ["a", "b"]
    run_cli("export", "original", "--store", store, "--model", "b", "--out", tmp_path / "b", "--quiet")
    assert_state_dicts_identical(load_dir(tmp_path / "b"), load_dir(big.b), "b after re-ingest")


def test_killed_merge_resumes_to_the_uninterrupted_result(big, store_ab, uninterrupted, tmp_path):
    store = copy_store(store_ab, tmp_path / "store")
    before = StoreState.capture(store)
    exports_before = _exports(store, tmp_path / "before")

    proc = mmer_subprocess("merge", "--store", store, *MERGE_ARGS)
    first_shard = store / layout.version_staging(2) / "shards" / "00000.json"
    _wait_for(proc, first_shard.exists, "shard 0 of version 2 is complete")
    _kill(proc)

    # version 1 is still the latest and intact; version 2 is invisible
    status = status_json(store)
    assert [v["version"] for v in status["versions"]] == [1]
    after = StoreState.capture(store)
    assert (after.seq, after.models, after.versions) == (before.seq, before.models, before.versions)
    assert (store / layout.version_tau_star(2)).is_dir()  # killed after writing chunks
    exports_after = _exports(store, tmp_path / "after")
    for kind in exports_before:
        assert_state_dicts_identical(exports_after[kind], exports_before[kind], f"{kind} after the kill")

    # re-run: resumes from the finished shards, and gives what an uninterrupted merge gives
    run_cli("merge", "--store", store, *MERGE_ARGS)
    got, want = status_json(store)["versions"], status_json(uninterrupted)["versions"]
    assert [v["version"] for v in got] == [1, 2]
    details = got[1]["details"]
    assert details["resumed"] is True
    assert "0" not in details["shard_seconds"]["FinalPass"]  # shard 0 was not redone
    assert want[1]["details"]["resumed"] is False
    for field in ("models", "lams", "topk", "scope", "mask_density", "tau_star_density"):
        assert got[1][field] == want[1][field], field
    assert details["thresholds"] == want[1]["details"]["thresholds"]
    _arrays_equal(store, uninterrupted, 2, ["a", "b"])
    for model_id in ("a", "b"):
        x = _exports(store, tmp_path / f"got-{model_id}", model_id)
        y = _exports(uninterrupted, tmp_path / f"want-{model_id}", model_id)
        for kind in x:
            assert_state_dicts_identical(x[kind], y[kind], f"{model_id} {kind}")
    assert not (store / layout.version_staging(2)).exists()  # staging is cleaned up after publishing


def test_merge_killed_while_creating_its_arrays_can_be_rerun(store_ab, uninterrupted, tmp_path):
    """Killed right after staging starts (while the version's arrays are being created): a re-run
    must not trust the half-made staging area."""
    store = copy_store(store_ab, tmp_path / "store")
    proc = mmer_subprocess("merge", "--store", store, *MERGE_ARGS)
    plan = store / layout.version_staging(2) / "plan.json"
    _wait_for(proc, plan.exists, "version 2's staging starts")
    _kill(proc)
    assert [v["version"] for v in status_json(store)["versions"]] == [1]

    run_cli("merge", "--store", store, *MERGE_ARGS)
    got, want = status_json(store)["versions"][1], status_json(uninterrupted)["versions"][1]
    assert got["mask_density"] == want["mask_density"]
    _arrays_equal(store, uninterrupted, 2, ["a", "b"])


def test_killed_base_ingest_can_be_rerun(big, tmp_path):
    """A store whose base ingest was killed has no base; the same command re-run completes."""
    store = tmp_path / "store"
    proc = mmer_subprocess("ingest", "--store", store, "--base", big.base, "--chunk-elems", 64, "--quiet")
    llm = store / "base" / "llm"
    _wait_for(proc, lambda: llm.is_dir() and len(list(llm.glob("*/zarr.json"))) >= 2, "base arrays appear")
    _kill(proc)
    status = status_json(store)
    assert status["base"] is None and status["models"] == []
    run_cli("ingest", "--store", store, "--base", big.base, "--chunk-elems", 64, "--quiet")
    st = status_json(store)
    assert st["base"]["base_source"] == str(big.base) and st["base"]["chunk_elems"] == 64
    assert json.loads(st["base"]["base_config"])["num_hidden_layers"] == LAYERS


def test_killed_add_leaves_the_served_version_and_a_rerun_finishes_it(big, tmp_path):
    """SIGKILL in the final pass of `mmer add`: version 1 stays served and intact for readers;
    running the same add again completes it, equal to an uninterrupted add."""
    store = copy_store(big.store_a, tmp_path / "store")
    clean = copy_store(big.store_a, tmp_path / "clean")
    add = ("add", "--store", None, "--model", "b", "--modality", "image", "--path", big.b, *MERGE_ARGS)
    before = _exports(store, tmp_path / "before")
    proc = mmer_subprocess(*[store if a is None else a for a in add])
    masks = store / "versions" / "000002" / "masks"
    _wait_for(proc, lambda: len(list(masks.glob("*/c/*"))) >= 20, "the add's final pass writes chunks")
    _kill(proc)
    status = status_json(store)
    assert status["serving"]["version"] == 1 and [v["version"] for v in status["versions"]] == [1]
    after = _exports(store, tmp_path / "after")
    for kind in before:
        assert_state_dicts_identical(after[kind], before[kind], f"{kind} after the killed add")
    run_cli(*[store if a is None else a for a in add])  # picks up the ingested model, merges it
    run_cli(*[clean if a is None else a for a in add])
    assert status_json(store)["serving"]["version"] == 2
    _arrays_equal(store, clean, 2, ["a", "b"])
