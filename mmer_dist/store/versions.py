"""Merge versions: staging while a merge runs, resuming after a crash, atomic publication.

A merge writes version v under ``versions/v/`` (invisible: the catalog does not list it), with a
``_staging/`` folder holding the run's fingerprint (inputs + settings + shard plan), the decided
thresholds and majority signs, and one completion mark per finished shard. A re-run with the
same fingerprint continues from those marks; a different fingerprint discards the leftovers.
``publish_version`` is the single step that makes a version visible: one catalog commit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from mmer_dist.store import layout
from mmer_dist.store.catalog import Catalog, VersionRecord
from mmer_dist.store.store import Store


def fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


_ARRAYS_READY = "arrays_ready.json"


@dataclass
class Staging:
    store: Store
    version: int
    fingerprint: str
    resumed: bool

    @property
    def _dir(self) -> str:
        return layout.version_staging(self.version)

    @classmethod
    def open(cls, store: Store, version: int, fp: str) -> Staging:
        """Continue the staging of ``version`` if it is the same run and its arrays were all
        created (``mark_arrays_ready``), else start it afresh."""
        plan_path = f"{layout.version_staging(version)}/plan.json"
        plan = _read_json(store, plan_path)
        if (isinstance(plan, dict) and plan.get("fingerprint") == fp
                and store.exists_path(f"{layout.version_staging(version)}/{_ARRAYS_READY}")):
            return cls(store, version, fp, resumed=True)
        store.remove(layout.version_root(version))
        store.put_bytes(plan_path, json.dumps({"fingerprint": fp}).encode())
        return cls(store, version, fp, resumed=False)

    def mark_arrays_ready(self) -> None:
        """Every array of the version exists: from now on a re-run may resume this staging (a run
        killed while creating them must not, or it would write into missing arrays)."""
        self.store.put_bytes(f"{self._dir}/{_ARRAYS_READY}", b"{}")

    def save_state(self, state: dict) -> None:
        self.store.put_bytes(f"{self._dir}/state.json", json.dumps(state).encode())

    def load_state(self) -> dict | None:
        return _read_json(self.store, f"{self._dir}/state.json")

    def mark_shard_done(self, shard: int, record: dict) -> None:
        self.store.put_bytes(f"{self._dir}/shards/{shard:05d}.json", json.dumps(record).encode())

    def done_shards(self) -> dict[int, dict]:
        out = {}
        for name in self.store.list_files(f"{self._dir}/shards"):
            record = _read_json(self.store, f"{self._dir}/shards/{name}")
            if record is not None:  # a mark cut short by a kill: the shard is simply redone
                out[int(name.split(".")[0])] = record
        return out

    def discard(self) -> None:
        self.store.remove(self._dir)

    def abandon(self) -> None:
        """After a failed run: remove the whole unpublished version (arrays and staging). Never a
        version the catalog lists; an unreadable catalog leaves it to `mmer gc`."""
        try:
            published = any(v.version == self.version for v in self.store.catalog().versions)
        except Exception:
            return
        if not published:
            try:
                self.store.remove(layout.version_root(self.version))
            except OSError:
                pass  # e.g. the store went read-only; `mmer gc` removes it later


def _read_json(store: Store, path: str):
    """A staging file's JSON, or None when it is missing or was cut short (a run killed while
    writing it leaves an empty or partial file: treated as never written)."""
    if not store.exists_path(path):
        return None
    try:
        return json.loads(store.get_bytes(path))
    except ValueError:
        return None


def publish_version(store: Store, record: VersionRecord, expected: Catalog, promote: bool = True) -> Catalog:
    """Make ``record`` the latest version — and, with ``promote``, the served one — in one catalog
    commit, after all its arrays are written: a server never sees a promoted version that is not
    complete."""
    catalog = expected.replace(versions=expected.versions + (record,))
    if promote:
        catalog = catalog.promoted(record.version, at=record.created_at)
    return store.commit(catalog, expected.seq)
