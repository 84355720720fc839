"""The Ray backend on real Ray: a two-node cluster, a worker killed mid-pass, progress and catalog.

Every test owns its Ray (a ``ray.cluster_utils.Cluster`` or the backend's embedded ``ray.init``)
and tears it down; results are compared bit for bit with a local-backend merge of the same store.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mmer_dist.errors import MmerError
from mmer_dist.ingest import ingest_base, ingest_model
from mmer_dist.merge.engine import MergeRequest, merge
from mmer_dist.merge.incremental import add_model
from mmer_dist.merge.local import LocalBackend
from mmer_dist.merge.ray_backend import RayBackend
from mmer_dist.store import layout
from mmer_dist.store.store import Store
from ray_helpers import (  # noqa: F401  (ray_env is a fixture)
    CHUNK_ELEMS, MODELS, SHARD_RESOURCE, RecordingRayBackend, assert_ray_details, assert_same_version, fresh_store,
    model_source, ray_env, reference_url, template_dir, two_node_cluster, version_arrays,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return template_dir(tmp_path_factory)


def test_two_node_cluster_merge_spreads_shards_and_matches_local(ray_env, template, tmp_path):
    import ray

    url = fresh_store(template, tmp_path / "store")
    with two_node_cluster() as cluster:
        backend = RecordingRayBackend(address=cluster.address, worker_resources={SHARD_RESOURCE: 1})
        assert backend.default_workers() == 2  # `--workers` default: one shard per node
        record = merge(url, MergeRequest(), backend, workers=2, progress=False)
        cluster_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    # one actor per node: the shards really ran on different nodes of the cluster
    assert sorted(backend.nodes) == [0, 1]
    assert len(set(backend.nodes.values())) == 2, backend.nodes
    assert set(backend.nodes.values()) <= cluster_nodes
    assert len(cluster_nodes) == 2
    # no crash: no restarts, the same worker processes throughout
    assert backend.restarts == {0: 0, 1: 0}
    assert backend.end_pids == backend.start_pids

    published = Store.open(url).catalog().latest_version()
    assert published == record and record.version == 1
    assert record.models == [m[0] for m in MODELS]
    assert_ray_details(record, n_shards=2)
    assert_same_version(url, reference_url(template))
    assert not Path(url, layout.version_staging(1)).exists()  # staging discarded on publish


class MidPassKiller(threading.Thread):
    """SIGKILLs shard ``victim``'s actor once its final pass has written its first chunks, and
    records the evidence that the kill landed mid-pass (chunks written before/after, the shard's
    completion mark absent)."""

    def __init__(self, url: str, backend: RecordingRayBackend, victim: int, version: int, timeout: float = 180):
        super().__init__(daemon=True)
        self.url, self.backend, self.victim, self.version, self.timeout = url, backend, victim, version, timeout
        self.error: BaseException | None = None
        self.killed_pid: int | None = None
        self.chunks_written = self.chunks_total = 0
        self.mark_at_kill = True

    def chunk_file(self, chunk) -> Path:
        return Path(self.url, layout.version_tau_star(self.version), chunk.tensor, "c", str(chunk.index), "0")

    def run(self) -> None:
        try:
            if not self.backend.started.wait(self.timeout):
                raise TimeoutError("the merge never started its actors")
            shard = self.backend.shards[self.victim]
            first = [self.chunk_file(c) for c in shard.chunks[:8]]
            mark = Path(self.url, layout.version_staging(self.version), "shards", f"{self.victim:05d}.json")
            deadline = time.monotonic() + self.timeout
            while not any(p.exists() for p in first):
                if time.monotonic() > deadline:
                    raise TimeoutError("the final pass of the victim shard never wrote a chunk")
                time.sleep(0.005)
            self.mark_at_kill = mark.exists()
            self.killed_pid = self.backend.start_pids[self.victim]
            os.kill(self.killed_pid, signal.SIGKILL)
            self.chunks_total = len(shard.chunks)
            self.chunks_written = sum(self.chunk_file(c).exists() for c in shard.chunks)
        except BaseException as e:  # reported by the test
            self.error = e


def test_worker_killed_mid_final_pass_is_restarted_and_merge_matches_local(ray_env, template, tmp_path):
    url = fresh_store(template, tmp_path / "store")
    with two_node_cluster() as cluster:
        backend = RecordingRayBackend(address=cluster.address, worker_resources={SHARD_RESOURCE: 1})
        killer = MidPassKiller(url, backend, victim=1, version=1)
        killer.start()
        record = merge(url, MergeRequest(), backend, workers=2, progress=False)
        killer.join(timeout=30)
    assert killer.error is None, repr(killer.error)

    # the kill really landed inside the victim's final pass
    assert killer.killed_pid is not None
    assert not killer.mark_at_kill
    assert 0 < killer.chunks_written < killer.chunks_total, (killer.chunks_written, killer.chunks_total)
    # Ray restarted that actor (a new process) and retried the pass; the other shard was untouched
    assert backend.restarts[1] >= 1, backend.restarts
    assert backend.end_pids[1] != killer.killed_pid
    assert backend.restarts[0] == 0 and backend.end_pids[0] == backend.start_pids[0]
    # progress counted every entry of every pass once, the retried shard's entries included
    assert [p[0] for p in backend.progress] == record.passes
    assert all(reported == expected for _, reported, expected in backend.progress), backend.progress

    assert record.version == 1 and Store.open(url).catalog().latest_version() == record
    details = assert_ray_details(record, n_shards=2)
    assert details["resumed"] is False
    assert_same_version(url, reference_url(template))


def test_progress_and_catalog_on_embedded_ray(ray_env, template, tmp_path):
    import ray

    url = fresh_store(template, tmp_path / "store")
    backend = RecordingRayBackend(address="local")  # the backend starts its own embedded Ray
    assert backend.default_workers() == 1  # one node
    assert ray.is_initialized()
    record = merge(url, MergeRequest(lam={"point-cls": 0.8}), backend, workers=2, progress=False)

    # progress: every pass reported each of its parameters once
    assert [p[0] for p in backend.progress] == record.passes
    for name, reported, expected in backend.progress:
        assert reported == expected, (name, reported, expected)
    assert backend.actors == {}  # stopped

    catalog = Store.open(url).catalog()
    version = catalog.latest_version()
    assert version == record
    assert version.backend == "ray"
    assert version.lams == [1.0, 0.8, 1.0]
    assert len(version.mask_density) == len(MODELS)
    assert all(0.0 < d < 1.0 for d in version.mask_density)
    details = assert_ray_details(version, n_shards=2)
    assert details["shards"] == [s.describe() for s in backend.shards]
    assert sum(s.numel for s in backend.shards) == sum(t.numel for t in catalog.tensors)
    # the catalog keeps the details as JSON text, readable by any Parquet reader
    assert json.loads(catalog.version(1).details) == details

    # actors no node can host: a clear error after the start timeout, not a hang; nothing published
    hopeless = RayBackend(address="local", worker_resources={"no_such_resource": 1}, start_timeout=3)
    with pytest.raises(MmerError, match="no_such_resource=1"):
        merge(url, MergeRequest(), hopeless, workers=2, progress=False)
    assert hopeless.actors == {}
    assert [v.version for v in Store.open(url).catalog().versions] == [1]

    # workers that cannot open the store (a path only the driver sees): the store's own error
    blind = RayBackend(address="local")
    with pytest.raises(MmerError, match="could not start on its Ray node: .*is not an mmer store"):
        blind.start(dataclasses.replace(backend.job, store_url=str(tmp_path / "elsewhere")), backend.shards)
    assert blind.actors == {}
    ray.shutdown()


def _served_pair(template: Path, dest: Path) -> str:
    """A store with the first two models merged and served (version 1), the third not ingested."""
    url = str(dest)
    ingest_base(url, template / "checkpoints" / "base", chunk_elems=CHUNK_ELEMS, progress=False)
    for model_id, _, modality, _ in MODELS[:2]:
        ingest_model(url, model_id, progress=False, modality=modality, **model_source(template, model_id))
    merge(url, MergeRequest(), LocalBackend(), workers=1, progress=False)
    return url


def test_embedded_ray_never_joins_a_cluster_this_machine_runs(ray_env):
    """``--address local`` (and the default without $RAY_ADDRESS) is a new embedded Ray even while
    another cluster runs here: a bare ``ray.init()`` would join that one."""
    import ray

    with two_node_cluster() as cluster:
        backend = RayBackend(address="local")
        assert backend.default_workers() == 1  # its own one-node Ray, not the two-node cluster
        assert ray.get_runtime_context().gcs_address != cluster.address
        ray.shutdown()


def test_add_on_a_two_node_cluster_equals_the_local_add_and_a_full_merge(ray_env, template, tmp_path):
    """`mmer add --backend ray`: the derived version's final pass runs on both nodes, and the result
    is the local add's bit for bit, which is the from-scratch merge of all three models."""
    new, _, modality, _ = MODELS[2]
    on_ray, local = _served_pair(template, tmp_path / "ray"), _served_pair(template, tmp_path / "local")
    add_model(local, new, modality=modality, backend=LocalBackend(), progress=False, **model_source(template, new))
    with two_node_cluster() as cluster:
        backend = RecordingRayBackend(address=cluster.address, worker_resources={SHARD_RESOURCE: 1})
        derived = add_model(on_ray, new, modality=modality, backend=backend, workers=2, progress=False,
                            **model_source(template, new))
    assert len(set(backend.nodes.values())) == 2, backend.nodes
    # no threshold pass; here the third model flips the majority sign the first two voted for, so
    # the entries whose sign sum is exactly 0 are rewritten from what each actor's final pass kept
    assert derived.reused and derived.record.backend == "ray"
    details = json.loads(derived.record.details)
    assert details["decided_by_majority"]["*"] > 0
    assert derived.record.passes == ["FinalPass", "ZeroSumPass"]
    assert details["majority_rewritten"] == details["decided_by_majority"]["*"]
    assert Store.open(on_ray).catalog().serving_version() == 2
    assert_same_version(on_ray, local, 2)
    got, scratch = version_arrays(on_ray, 2), version_arrays(reference_url(template))
    assert got.keys() == scratch.keys()
    assert [k for k in got if not np.array_equal(got[k], scratch[k])] == []
