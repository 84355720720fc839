"""Garbage collection: remove what no committed catalog snapshot refers to and no writer holds.

Everything is decided under the writer lock. Every writer (ingest, merge, gc) holds that lock for
its whole run, so whatever staging exists while gc holds it belongs to a writer that is gone
(killed, or its machine lost): a decision by lock ownership, not by age.

Garbage, each kind found by one small function (``FINDERS``; a later ``--keep K`` for old
versions is one more finder):
- ``models/<id>/`` of a model the catalog does not list (an ingest that never committed);
- ``versions/<v>/`` of a version the catalog does not list (a merge that never published);
- ``versions/<v>/_staging/`` of a published version (its run died right after publishing);
- ``base/`` while the catalog has no base (a base ingest that never committed);
- catalog snapshot directories no commit record names (a writer that lost its commit race or
  died before committing), and temporary files of interrupted atomic writes.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mmer_dist.store import layout
from mmer_dist.store.catalog import Catalog, commit_path, read_commit
from mmer_dist.store.store import Store


@dataclass(frozen=True)
class Garbage:
    path: str  # relative to the store root
    reason: str
    bytes: int


def _children(store: Store, path: str) -> list[str]:
    """Names of the entries directly under a store path (folders and files)."""
    if not store.exists_path(path):
        return []
    base = store.abspath(path).rstrip("/")
    return sorted(posixpath.basename(p.rstrip("/")) for p in store.fs.ls(base, detail=False)
                  if p.rstrip("/") != base)


def _uncommitted_models(store: Store, catalog: Catalog) -> Iterator[tuple[str, str]]:
    known = {m.id for m in catalog.models}
    for name in _children(store, "models"):
        if name not in known and name != "zarr.json":
            yield f"models/{name}", "model never committed (an interrupted or failed ingest)"


def _unpublished_versions(store: Store, catalog: Catalog) -> Iterator[tuple[str, str]]:
    published = {posixpath.basename(layout.version_root(v.version)) for v in catalog.versions}
    for name in _children(store, "versions"):
        if name == "zarr.json":
            continue
        if name not in published:
            yield f"versions/{name}", "version never published (an interrupted or failed merge)"
        elif store.exists_path(f"versions/{name}/_staging"):
            yield f"versions/{name}/_staging", "staging of a published version"


def _orphan_base(store: Store, catalog: Catalog) -> Iterator[tuple[str, str]]:
    if catalog.store is None and store.exists_path("base"):
        yield "base", "base never committed (an interrupted or failed base ingest)"


def _catalog_leftovers(store: Store, catalog: Catalog) -> Iterator[tuple[str, str]]:
    named = {read_commit(store.fs, store.root, s).snapshot for s in range(1, catalog.seq + 1)
             if store.fs.exists(commit_path(store.root, s))}
    for name in _children(store, f"{layout.CATALOG}/snapshots"):
        if name not in named:
            yield f"{layout.CATALOG}/snapshots/{name}", "catalog snapshot that was never committed"
    for folder in (layout.CATALOG, f"{layout.CATALOG}/commits"):
        for name in _children(store, folder):
            if ".tmp-" in name:
                yield f"{folder}/{name}", "temporary file of an interrupted write"


FINDERS: tuple[Callable[[Store, Catalog], Iterator[tuple[str, str]]], ...] = (
    _uncommitted_models, _unpublished_versions, _orphan_base, _catalog_leftovers)


def find_garbage(store: Store, catalog: Catalog) -> list[Garbage]:
    """What gc would remove; call under the writer lock, with the catalog read under it."""
    return [Garbage(path, reason, store.disk_usage(path)) for finder in FINDERS for path, reason in finder(store, catalog)]


def collect_garbage(url: str, dry_run: bool = False) -> list[Garbage]:
    store = Store.open(url)
    with store.writer_lock():
        garbage = find_garbage(store, store.catalog())
        if not dry_run:
            for item in garbage:
                store.remove(item.path)
    return garbage
