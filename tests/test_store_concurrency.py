"""One writer at a time on a local store: a second ingest or merge while another process (or this
one) holds the writer lock fails at once with a clear StoreError and changes nothing; a killed
lock holder does not leave the store locked."""

from __future__ import annotations

import signal
import sys
import threading
import time
import uuid

import pytest
from conftest import ingest_args
from store_helpers import StoreState, run_cli, status_json

from mmer_dist.errors import StoreError
from mmer_dist.merge.engine import MergeRequest, merge
from mmer_dist.merge.local import LocalBackend
from mmer_dist.ingest import ingest_model
from mmer_dist.store import locks
from mmer_dist.store.store import Store

HOLD_LOCK = """
import sys
from mmer_dist.store.store import Store
with Store.open(sys.argv[1]).writer_lock():
    print("locked", flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or kills us)
print("released", flush=True)
"""


def _holder(store):
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(store)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        pytest.fail(f"lock holder did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc


def test_second_writer_in_the_same_process_is_refused(stores, ckpts, tmp_path):
    store = stores.fresh(tmp_path / "store", models=True)
    before = StoreState.capture(store)
    with Store.open(str(store)).writer_lock():
        with pytest.raises(StoreError, match=r"another writer \(ingest, merge or gc\) holds .*\.writer\.lock"):
            ingest_model(str(store), "extra", ckpts.finetuned("llava", "bf16"), "image", progress=False)
        with pytest.raises(StoreError, match="another writer"):
            merge(str(store), MergeRequest(), LocalBackend(), progress=False)
    assert StoreState.capture(store) == before
    # once released, the same merge goes through
    merge(str(store), MergeRequest(), LocalBackend(), progress=False)
    assert [v["version"] for v in status_json(store)["versions"]] == [1]


def test_second_writer_while_another_process_holds_the_lock(stores, ckpts, tmp_path):
    store = stores.fresh(tmp_path / "store", models=True)
    before = StoreState.capture(store)
    holder = _holder(store)
    try:
        r = run_cli("merge", "--store", store, "--quiet", "--no-compile", ok=False)
        assert "another writer" in r.err and str(store) in r.err
        r = run_cli(*ingest_args(store, "extra", ckpts.finetuned("llava", "bf16"), "llava"), ok=False)
        assert "another writer" in r.err
        # readers are not blocked
        assert [m["id"] for m in status_json(store)["models"]] == ["llava-hf", "video-llava-hf", "llava", "generic"]
        assert StoreState.capture(store) == before
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0 and holder.stdout.read().strip() == "released"
    run_cli(*ingest_args(store, "extra", ckpts.finetuned("llava", "bf16"), "llava"))
    assert status_json(store)["models"][-1]["id"] == "extra"


def test_a_killed_lock_holder_does_not_leave_the_store_locked(stores, tmp_path):
    store = stores.fresh(tmp_path / "store", models=True)
    holder = _holder(store)
    assert "another writer" in run_cli("merge", "--store", store, "--quiet", "--no-compile", ok=False).err
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    run_cli("merge", "--store", store, "--quiet", "--no-compile")
    assert [v["version"] for v in status_json(store)["versions"]] == [1]


def test_stale_catalog_commit_is_refused(stores, tmp_path):
    """Object stores have no lock: a commit based on an old snapshot is refused instead."""
    store = Store.open(str(stores.fresh(tmp_path / "store", models=True)))
    old = store.catalog()
    store.commit(old.replace(models=old.models[:1]), old.seq)  # another writer got there first
    with pytest.raises(StoreError, match=f"snapshot {old.seq + 1}, expected {old.seq}"):
        store.commit(old, old.seq)
    assert [m.id for m in store.catalog().models] == ["llava-hf"]
    assert store.catalog().seq == old.seq + 1



@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_writer_given_wait_takes_the_lock_once_its_holder_lets_go(kind, tmp_path, capsys):
    """``--wait S`` (``locks.lock_wait``): refused at once without it; with it, the second writer
    says it waits, and takes the lock when the first releases it. Local stores lock a file,
    object stores (memory:// here) create a lease object: both wait the same way."""
    url = str(tmp_path / "store") if kind == "local" else f"memory://wait-{uuid.uuid4().hex[:6]}/store"
    store = Store.create(url)
    held, release = threading.Event(), threading.Event()

    def hold():
        with store.writer_lock():
            held.set()
            release.wait(timeout=300)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(timeout=60)
    with pytest.raises(StoreError, match="another writer .* --wait SECONDS"), locks.lock_wait(0):
        with store.writer_lock():
            pass
    taken: list[bool] = []

    def wait_for_it():
        with locks.lock_wait(300), store.writer_lock():
            taken.append(release.is_set())  # only once the holder was told to let go

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    said, deadline = "", time.monotonic() + 60
    while "waiting up to 300s" not in said and time.monotonic() < deadline:
        said += capsys.readouterr().err
        time.sleep(0.01)
    assert "another writer holds" in said and "waiting up to 300s" in said, said
    release.set()
    holder.join(timeout=60)
    waiter.join(timeout=60)
    assert taken == [True]
