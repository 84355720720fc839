"""Concurrent writers on object stores never both commit and never lose a commit (issue 18, item 9).

Against a real S3-compatible server the tests start on loopback (moto's server mode: real HTTP,
real S3 semantics for conditional writes, ``If-None-Match: *`` answered 412), and on fsspec's
``memory://``:

- two ``mmer merge`` processes started at once: the one that takes the store's writer lease
  publishes, the other fails at once with a clear message, touching nothing; every exit 0 has its
  version in the catalog, and the store verifies;
- two writers committing from the same catalog snapshot (the lease bypassed, as if it had been
  broken): exactly one commit lands, the other is told to re-run, and its snapshot files are gone.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import torch
from store_helpers import mmer_subprocess, run_cli

from mmer_dist.demo import tiny_models
from mmer_dist.errors import StoreError
from mmer_dist.merge.engine import MergeRequest, merge
from mmer_dist.merge.local import LocalBackend
from mmer_dist.store.catalog import ModelRecord
from mmer_dist.store.locks import lock_wait
from mmer_dist.store.store import Store

import moto.server as moto_server  # noqa: E402  (moto[server] and s3fs are in the dev extra)

pytestmark = pytest.mark.slow
MERGE = ("--quiet", "--no-compile", "--device", "cpu")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the environment pointing this process and its children at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("mmer-test")
        yield "s3://mmer-test"
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def small_ckpts(ckpts):
    """One decoder layer: few arrays, so few requests (a request to moto costs ~20 ms here)."""
    base = ckpts.custom("obj-base", lambda p: tiny_models.save_base(p, dtype=torch.bfloat16, num_hidden_layers=1))
    models = [ckpts.custom(f"obj-{i}", lambda p, i=i: tiny_models.save_finetuned(base, p, "llava", dtype=torch.bfloat16,
                                                                                  seed=50 + i)) for i in range(2)]
    return base, models


def _ingested(url, small_ckpts):
    base, models = small_ckpts
    run_cli("ingest", "--store", url, "--base", base, "--quiet")
    for i, path in enumerate(models):
        run_cli("ingest", "--store", url, "--model", f"m{i}", "--path", path, "--modality", "image", "--quiet")
    return url


def test_two_merges_at_once_on_s3(s3, small_ckpts):
    url = _ingested(f"{s3}/two-merges", small_ckpts)
    procs = [mmer_subprocess("merge", "--store", url, *MERGE) for _ in range(2)]
    results = [(p.wait(timeout=600), p.communicate()) for p in procs]
    ok = [out for rc, (out, err) in results if rc == 0]
    failed = [err for rc, (out, err) in results if rc != 0]
    versions = [v.version for v in Store.open(url).catalog().versions]
    assert len(versions) == len(ok) >= 1, (versions, results)  # no lost commit
    assert len(ok) == 1 and len(failed) == 1, results  # they overlapped: one won the lease
    assert "another writer" in failed[0] and "Traceback" not in failed[0], failed[0]
    assert f"published version {versions[0]}" in ok[0]
    run_cli("verify", "--store", url, "--quiet")
    # the loser can simply re-run
    run_cli("merge", "--store", url, *MERGE)
    assert [v.version for v in Store.open(url).catalog().versions] == [1, 2]


def _commit_race(url: str, rounds: int) -> None:
    """Two writers commit from the same snapshot at the same moment: exactly one lands."""
    store = Store.open(url)
    record = ModelRecord("m", "image", "llava", "/src", "bfloat16", 10, 0, 3, "ab" * 32, 1.0, "t", 0.1)
    for r in range(rounds):
        start = store.catalog()
        barrier = threading.Barrier(2)
        outcomes: list = []

        def writer(tag: str) -> None:
            mine = Store.open(url)
            models = start.models + (ModelRecord(**{**record.__dict__, "id": f"{tag}{r}"}),)
            barrier.wait()
            try:
                mine.commit(start.replace(models=models), start.seq)
                outcomes.append(tag)
            except StoreError as e:
                assert "another writer committed first" in str(e)
                outcomes.append("lost")

        threads = [threading.Thread(target=writer, args=(t,)) for t in ("a", "b")]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
        assert sorted(outcomes) in (["a", "lost"], ["b", "lost"]), outcomes
        winner = next(o for o in outcomes if o != "lost")
        after = store.catalog()
        assert after.seq == start.seq + 1 and after.models[-1].id == f"{winner}{r}"
    snapshots = store.fs.ls(f"{store.root}/catalog/snapshots", detail=False)
    assert len(snapshots) == store.catalog().seq  # every loser removed its snapshot files


def test_concurrent_commits_on_s3(s3):
    url = f"{s3}/commits-{uuid.uuid4().hex[:6]}"
    Store.create(url)
    _commit_race(url, rounds=4)


def test_concurrent_commits_on_memory():
    url = f"memory://commits-{uuid.uuid4().hex[:6]}/store"
    Store.create(url)
    _commit_race(url, rounds=20)


def test_two_merges_at_once_on_memory(small_ckpts):
    """memory:// lives in one process: two merges on two threads. Neither waits for the lock
    (``lock_wait(0)``, a thread's own setting): the one that meets it held fails with one line;
    one that comes after the other has finished publishes the next version. Either way the
    catalog lists exactly the versions that were published."""
    url = _ingested(f"memory://merges-{uuid.uuid4().hex[:6]}/store", small_ckpts)
    outcomes: list = []
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        try:
            with lock_wait(0):
                outcomes.append(merge(url, MergeRequest(), LocalBackend(), progress=False).version)
        except StoreError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=run) for _ in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=600) for t in threads]
    published = sorted(o for o in outcomes if isinstance(o, int))
    assert len(outcomes) == 2 and published in ([1], [1, 2]), outcomes
    if published == [1]:
        assert "another writer" in next(o for o in outcomes if isinstance(o, str)), outcomes
    assert [v.version for v in Store.open(url).catalog().versions] == published
    run_cli("verify", "--store", url, "--quiet")


def test_a_dead_writers_lease_is_broken(s3):
    """A lease not renewed for LEASE_SECONDS belongs to a dead writer: the next writer takes it."""
    from mmer_dist.store import locks

    url = f"{s3}/lease-{uuid.uuid4().hex[:6]}"
    store = Store.create(url)
    lease = {"run": "dead", "host": "gone", "pid": 1, "renewed": time.time() - locks.LEASE_SECONDS - 1}

    store.fs.pipe_file(f"{store.root}/{locks.LOCK_NAME}", json.dumps(lease).encode())
    with store.writer_lock():
        assert locks.read_lease(store.fs, store.root)["run"] != "dead"
    assert locks.read_lease(store.fs, store.root) is None
    lease["renewed"] = time.time()  # a live one is respected
    store.fs.pipe_file(f"{store.root}/{locks.LOCK_NAME}", json.dumps(lease).encode())
    with pytest.raises(StoreError, match="another writer"):
        with store.writer_lock():
            pass
