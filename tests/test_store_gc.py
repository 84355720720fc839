"""No staging outlives its command (issue 18, item 7).

A failed merge removes its staging; what a killed ingest or merge leaves (SIGKILL runs no clean-up)
is removed by ``mmer gc``, decided under the writer lock: gc refuses while a writer holds it, and
never touches a committed model or version.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import copy_store
from store_helpers import StoreState, assert_state_dicts_identical, load_dir, mmer_subprocess, run_cli, status_json

from mmer_dist.demo import tiny_models
from mmer_dist.store import layout

LAYERS, CHUNK_ELEMS = 8, 256
MERGE = ("--quiet", "--no-compile", "--device", "cpu")


@pytest.fixture(scope="module")
def slow_store(ckpts, tmp_path_factory):
    """base + model a, merged (v1), on a fine chunk grid so that commands run long enough to kill."""
    base = ckpts.custom("gc-base", lambda p: tiny_models.save_base(p, dtype=torch.bfloat16, num_hidden_layers=LAYERS))
    a = ckpts.custom("gc-a", lambda p: tiny_models.save_finetuned(base, p, "llava", dtype=torch.bfloat16, seed=31))
    b = ckpts.custom("gc-b", lambda p: tiny_models.save_finetuned(base, p, "llava", dtype=torch.bfloat16, seed=32))
    store = tmp_path_factory.mktemp("gc") / "store"
    run_cli("ingest", "--store", store, "--base", base, "--chunk-elems", CHUNK_ELEMS, "--quiet")
    run_cli("ingest", "--store", store, "--model", "a", "--path", a, "--modality", "image", "--quiet")
    run_cli("merge", "--store", store, *MERGE)
    return type("Slow", (), dict(store=store, a=a, b=b))


def _kill_when(proc, condition, what):
    deadline = time.monotonic() + 120
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


def test_gc_removes_what_killed_commands_left_and_nothing_else(slow_store, tmp_path):
    store = copy_store(slow_store.store, tmp_path / "store")
    before = StoreState.capture(store)
    run_cli("export", "model", "--store", store, "--model", "a", "--out", tmp_path / "before", "--quiet")

    proc = mmer_subprocess("ingest", "--store", store, "--model", "b", "--path", slow_store.b, "--modality", "image",
                           "--quiet")
    llm = store / "models" / "b" / "llm"
    _kill_when(proc, lambda: llm.is_dir() and len(list(llm.glob("*/zarr.json"))) >= 3, "b's arrays appear")
    proc = mmer_subprocess("merge", "--store", store, *MERGE, "--workers", "4")
    shard = store / layout.version_staging(2) / "shards" / "00000.json"
    _kill_when(proc, shard.exists, "a shard of version 2 is done")
    assert (store / "models" / "b").exists() and (store / layout.version_root(2)).exists()

    r = run_cli("gc", "--store", store, "--dry-run")
    assert "would remove models/b" in r.out and f"would remove {layout.version_root(2)}" in r.out
    assert (store / "models" / "b").exists()
    r = run_cli("gc", "--store", store)
    assert "removed models/b" in r.out and "never committed" in r.out
    after = StoreState.capture(store)
    assert set(after.files) ^ set(before.files) == set() and after == before
    run_cli("export", "model", "--store", store, "--model", "a", "--out", tmp_path / "after", "--quiet")
    assert_state_dicts_identical(load_dir(tmp_path / "after"), load_dir(tmp_path / "before"), "a after gc")
    assert "nothing to remove" in run_cli("gc", "--store", store).out
    run_cli("verify", "--store", store, "--quiet")


HOLD_LOCK = """
import sys
from mmer_dist.store.store import Store
with Store.open(sys.argv[1]).writer_lock():
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_gc_never_removes_what_a_live_writer_holds(slow_store, tmp_path):
    store = copy_store(slow_store.store, tmp_path / "store")
    (store / "models" / "ghost").mkdir()  # looks abandoned, but a writer holds the lock
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(store)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = run_cli("gc", "--store", store, ok=False)
        assert "another writer" in r.err and (store / "models" / "ghost").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert "removed models/ghost" in run_cli("gc", "--store", store).out


def test_a_failed_merge_leaves_no_staging(slow_store, tmp_path):
    """A model chunk that cannot be decoded makes the merge fail part-way; its version's arrays
    and staging are removed, so nothing is left for anyone to clean up."""
    store = copy_store(slow_store.store, tmp_path / "store")
    run_cli("ingest", "--store", store, "--model", "b", "--path", slow_store.b, "--modality", "image", "--quiet")
    before = StoreState.capture(store)
    chunks = sorted((store / "models" / "b" / "llm" / "lm_head.weight" / "c").rglob("*"))
    victim = [p for p in chunks if p.is_file()][-1]
    victim.write_bytes(victim.read_bytes()[:7])
    r = run_cli("merge", "--store", store, *MERGE, ok=False)
    assert "lm_head.weight" in r.err and "Traceback" not in r.err
    after = StoreState.capture(store)
    assert [f for f in after.files if f.startswith("versions/000002")] == []
    assert (after.seq, after.versions) == (before.seq, before.versions)
    assert [v["version"] for v in status_json(store)["versions"]] == [1]


def test_gc_removes_temporary_files_of_interrupted_writes_in_committed_folders(slow_store, tmp_path):
    """A writer killed inside an atomic write leaves ``<name>.<32 hex>.partial`` (zarr's metadata
    writes, the direct chunk path), also beside committed data: gc removes those and only those."""
    store = copy_store(slow_store.store, tmp_path / "store")
    before = StoreState.capture(store)
    chunk = next((store / "models" / "a" / "llm").glob("*/c/0/0"))
    litter = [store / f"zarr.{'a' * 32}.partial", chunk.parent / f"0.{'b' * 32}.partial"]
    keep = [store / "notes.partial", chunk.parent / "0.partial"]  # not a temporary name: not ours to delete
    for path in litter + keep:
        path.write_bytes(b"half")
    outside = tmp_path / "elsewhere"  # a link out of the store: nothing behind it is gc's
    outside.mkdir()
    (outside / f"x.{'c' * 32}.partial").write_bytes(b"not the store's")
    (store / "link").symlink_to(outside)
    r = run_cli("gc", "--store", store)
    assert (outside / f"x.{'c' * 32}.partial").exists()
    (store / "link").unlink()
    assert r.out.count("temporary file of an interrupted write") == 2, r.out
    assert not any(p.exists() for p in litter) and all(p.exists() for p in keep)
    for p in keep:
        p.unlink()
    assert StoreState.capture(store) == before
