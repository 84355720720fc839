"""Shared pieces of the Ray tests: a small real store, bit-exact version comparison, Ray set-up.

The store is built once per test session from tiny real checkpoints (a bf16 Llama base and three
``generic``-format fine-tunes) with a small chunk size, so a merge has hundreds of chunks per shard
and its final pass lasts long enough to kill a worker in the middle of it. Next to it sits a
reference copy merged with the local backend (one shard), the oracle every Ray merge must match
bit for bit. Each test copies the unmerged store into its own tmp folder.

Kept independent of ``conftest.py`` on purpose: the Ray tests own their fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mmer_dist.demo import tiny_models
from mmer_dist.merge.engine import MergeRequest, merge
from mmer_dist.merge.local import LocalBackend
from mmer_dist.merge.ray_backend import RayBackend
from mmer_dist.store import layout
from mmer_dist.store.catalog import VersionRecord
from mmer_dist.ingest import ingest_base, ingest_model
from mmer_dist.store.store import Store

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

N_LAYERS = 6
CHUNK_ELEMS = 64  # 2 rows of a 32-wide weight: ~1,100 chunks, ~550 per shard with 2 shards
MODELS = (  # (id, tiny_models format, modality, seed); generic: the fastest format to build and ingest
    ("audio-asr", "generic", "audio", 11),
    ("point-cls", "generic", "point", 12),
    ("audio-cap", "generic", "audio", 13),
)
SHARD_RESOURCE = "mmer_shard"

# Every Ray process a test starts (raylets, workers, `ray start`, the job's driver) inherits these.
# Ray 2.60 turns token authentication on for new local clusters when RAY_AUTH_MODE is unset (and
# `ray.init` then writes RAY_AUTH_MODE=token into os.environ, leaking into later tests); the tests
# pin it off so the dashboard's job API answers a plain HTTP client.
RAY_TEST_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


# -- the store ----------------------------------------------------------------------------------


def _build_template(root: Path) -> None:
    ckpt = root / "checkpoints"
    base = tiny_models.save_base(ckpt / "base", torch.bfloat16, seed=0, num_hidden_layers=N_LAYERS)
    store = str(root / "store")
    ingest_base(store, base, chunk_elems=CHUNK_ELEMS, progress=False)
    for model_id, fmt, modality, seed in MODELS:
        tiny_models.save_finetuned(base, ckpt / model_id, fmt, modality, dtype=torch.bfloat16, seed=seed)
        ingest_model(store, model_id, modality=modality, progress=False, **model_source(root, model_id))
    shutil.copytree(store, root / "reference")
    merge(str(root / "reference"), MergeRequest(), LocalBackend(), workers=1, progress=False)


def model_source(template: Path, model_id: str) -> dict:
    """Where the template's checkpoint of ``model_id`` is, as ``ingest_model`` / ``add_model`` take it."""
    path = template / "checkpoints" / model_id
    fmt = next(f for m, f, *_ in MODELS if m == model_id)
    extra = dict(fmt="generic", mapping_file=path / tiny_models.GENERIC_MAPPING_FILE) if fmt == "generic" else {}
    return dict(path=path, **extra)


def template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's unmerged store (``store``) and its local-backend merge (``reference``).

    Built on first use; later calls (from any test module) find it on disk."""
    root = tmp_path_factory.getbasetemp() / "ray_template"
    if not (root / "READY").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        _build_template(root)
        (root / "READY").write_text("ok")
    return root


def fresh_store(template: Path, dest: Path) -> str:
    """A private copy of the unmerged store; returns its URL (a local path)."""
    shutil.copytree(template / "store", dest)
    return str(dest)


def reference_url(template: Path) -> str:
    return str(template / "reference")


# -- comparing versions ---------------------------------------------------------------------------


def version_arrays(url: str, version: int | None = None) -> dict[str, np.ndarray]:
    """Every array of a published version: tau* (float32 as raw bits) and each packed mask."""
    store = Store.open(url)
    catalog = store.catalog()
    record = catalog.version(version)
    out = {}
    for t in catalog.tensors:
        tau = store.read_rows(f"{layout.version_tau_star(record.version)}/{t.name}", 0, t.rows)
        out[f"tau_star/{t.name}"] = tau.contiguous().view(torch.int32).numpy()
        masks = store.read(f"{layout.version_masks(record.version)}/{t.name}")
        for i, m in enumerate(record.models):
            out[f"masks/{m}/{t.name}"] = masks[i].numpy()
    return out


def assert_same_version(url: str, expected_url: str, version: int | None = None) -> None:
    """The version at ``url`` equals the reference's latest: every array bit for bit, and the
    catalog's summary numbers (thresholds, majority, densities) exactly."""
    got, want = version_arrays(url, version), version_arrays(expected_url)
    assert got.keys() == want.keys()
    differing = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differing, f"{len(differing)} arrays differ from the local merge, e.g. {differing[:3]}"
    a, b = Store.open(url).catalog().version(version), Store.open(expected_url).catalog().version(None)
    assert (a.models, a.lams, a.mask_density, a.tau_star_density, a.passes) == \
        (b.models, b.lams, b.mask_density, b.tau_star_density, b.passes)
    da, db = json.loads(a.details), json.loads(b.details)
    assert (da["thresholds"], da["majority"]) == (db["thresholds"], db["majority"])


def assert_ray_details(record: VersionRecord, n_shards: int) -> dict:
    """The version's catalog record carries backend "ray" and per-shard timings of every pass."""
    assert record.backend == "ray"
    details = json.loads(record.details)
    assert set(details["pass_seconds"]) == set(record.passes)
    assert set(details["shard_seconds"]) == set(record.passes)
    for name in record.passes:
        per_shard = details["shard_seconds"][name]
        assert sorted(per_shard) == [str(i) for i in range(n_shards)], (name, per_shard)
        assert all(isinstance(s, (int, float)) and s >= 0 for s in per_shard.values()), per_shard
        assert details["pass_seconds"][name] >= max(per_shard.values()) - 0.05
    assert len(details["shards"]) == n_shards
    return details


# -- Ray ------------------------------------------------------------------------------------------


@pytest.fixture
def ray_env(monkeypatch):
    """Pins the Ray environment for this test and leaves no Ray connection behind."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for key, value in RAY_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    yield
    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def two_node_cluster(cpus_per_node: int = 1):
    """A real two-node ``ray.cluster_utils.Cluster``; each node offers one ``mmer_shard`` slot,
    so shard actors that ask for the slot land one per node."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=cpus_per_node, resources={SHARD_RESOURCE: 1}, include_dashboard=False))
    try:
        cluster.add_node(num_cpus=cpus_per_node, resources={SHARD_RESOURCE: 1})
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def actor_restarts(actor) -> int:
    """How often Ray restarted ``actor`` (GCS actor table; no dashboard needed)."""
    from ray._private import state

    return int(state.actors(actor_id=actor._actor_id.hex()).get("NumRestarts", 0))


class RecordingRayBackend(RayBackend):
    """The real Ray backend, plus what the tests check: shards, actor pids and restarts, and the
    progress each pass reported."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started = threading.Event()
        self.job = None
        self.shards = []
        self.start_pids: dict[int, int] = {}
        self.end_pids: dict[int, int] = {}
        self.restarts: dict[int, int] = {}
        self.progress: list[tuple[str, int, int]] = []  # (pass, reported, expected)
        self.handles = {}

    def start(self, job, shards):
        import ray

        super().start(job, shards)
        self.job = job
        self.shards = list(shards)
        self.handles = dict(self.actors)
        self.start_pids = dict(zip(self.actors, ray.get([a.pid.remote() for a in self.actors.values()])))
        self.started.set()

    def run_pass(self, request, shards, progress):
        seen = [0]

        def counting(n: int) -> None:
            seen[0] += n
            progress(n)

        results = super().run_pass(request, shards, counting)
        self.progress.append((type(request).__name__, seen[0], sum(s.numel for s in shards)))
        return results

    def stop(self) -> None:
        import ray

        if self.actors:
            self.end_pids = dict(zip(self.actors, ray.get([a.pid.remote() for a in self.actors.values()])))
            self.restarts = {i: actor_restarts(a) for i, a in self.actors.items()}
        super().stop()


# -- processes --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for ``ray start`` and the jobs it runs: this venv first on PATH (so the
    job's ``python`` and ``mmer`` are the project's), Ray pinned as in ``RAY_TEST_ENV``."""
    env = dict(os.environ)
    env.update(RAY_TEST_ENV)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env
