"""Garbage collection: remove what no committed catalog snapshot refers to and no writer holds.

Everything is decided under the writer lock. Every writer (ingest, merge, gc) holds that lock for
its whole run, so whatever staging exists while gc holds it belongs to a writer that is gone
(killed, or its machine lost): a decision by lock ownership, not by age.

Garbage, each kind found by one small function (``FINDERS``):
- ``models/<id>/`` of a model the catalog does not list (an ingest that never committed);
- ``versions/<v>/`` of a version the catalog does not list (a merge that never published);
- ``versions/<v>/_staging/`` of a published version (its run died right after publishing);
- ``base/`` while the catalog has no base (a base ingest that never committed);
- catalog snapshot directories no commit record names (a writer that lost its commit race or
  died before committing), and temporary files of interrupted atomic writes.

With ``keep=K`` (``mmer gc --keep K``) also published versions beyond the K newest — never the
served one, nor one a live server lease holds — and models removed with ``mmer remove`` that no
kept version holds: their records leave the catalog in one commit, then their arrays go.
"""

from __future__ import annotations

import os
import posixpath
import re
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


# zarr's LocalStore writes ``zarr.json`` through ``zarr.<32 hex>.partial``, the direct chunk path
# ``<chunk>.<32 hex>.partial``: a SIGKILL between create and rename leaves one behind, also in a
# committed group (a parent's metadata is rewritten when an array is created under it)
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _interrupted_writes(store: Store, catalog: Catalog) -> Iterator[tuple[str, str]]:
    protocols = store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,)
    if "file" not in protocols:
        return  # only local stores write through temporary files (object stores put whole objects)
    root = store.abspath("").rstrip("/")
    real_root = os.path.realpath(root)
    for path in store.fs.find(root):
        # never through a link out of the store: only files that really lie in it
        if _PARTIAL.search(path) and not os.path.islink(path) and \
                os.path.commonpath([os.path.realpath(path), real_root]) == real_root:
            yield posixpath.relpath(path, root), "temporary file of an interrupted write"


FINDERS: tuple[Callable[[Store, Catalog], Iterator[tuple[str, str]]], ...] = (
    _uncommitted_models, _unpublished_versions, _orphan_base, _catalog_leftovers, _interrupted_writes)


def find_garbage(store: Store, catalog: Catalog) -> list[Garbage]:
    """What gc would remove; call under the writer lock, with the catalog read under it. A path
    inside one already found (a file in a never-committed model's folder) is not listed again."""
    found: list[Garbage] = []
    for finder in FINDERS:
        for path, reason in finder(store, catalog):
            if not any(path.startswith(g.path + "/") for g in found):
                found.append(Garbage(path, reason, store.disk_usage(path)))
    return found


def retired(store: Store, catalog: Catalog, keep: int) -> tuple[Catalog, list[tuple[str, str]]]:
    """The catalog without the versions and removed models ``--keep keep`` retires, and their
    paths with the reason; the served version and live-leased ones always stay."""
    from mmer_dist.store.serving import leased_versions

    newest = sorted((v.version for v in catalog.versions), reverse=True)[:keep]
    served = catalog.serving_version() if catalog.versions else None
    protected = set(newest) | leased_versions(store) | ({served} if served is not None else set())
    kept = tuple(v for v in catalog.versions if v.version in protected)
    out = [(layout.version_root(v.version), f"version {v.version}: older than the {keep} newest, not served, "
            "not leased") for v in catalog.versions if v.version not in protected]
    held = {m for v in kept for m in v.models}
    models = tuple(m for m in catalog.models if not (m.removed_at and m.id not in held))
    out += [(layout.model_root(m.id), f"model {m.id!r}: removed, and no kept version holds it")
            for m in catalog.models if m not in models]
    return catalog.replace(versions=kept, models=models), out


def collect_garbage(url: str, dry_run: bool = False, keep: int | None = None) -> list[Garbage]:
    store = Store.open(url)
    with store.writer_lock():
        catalog = store.catalog()
        garbage = find_garbage(store, catalog)
        if keep is not None:
            if keep < 1:
                from mmer_dist.errors import InvalidInputError
                raise InvalidInputError(f"--keep must be at least 1, got {keep}")
            smaller, paths = retired(store, catalog, keep)
            garbage += [Garbage(path, reason, store.disk_usage(path)) for path, reason in paths]
            if paths and not dry_run:
                store.commit(smaller, catalog.seq)  # out of the catalog first: no reader sees a half-removed one
        if not dry_run:
            for item in garbage:
                store.remove(item.path)
    return garbage
