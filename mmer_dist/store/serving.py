"""Which version is served: the catalog's serving log, promotion, rollback, and server leases.

The served version is explicit: ``mmer merge`` and ``mmer add`` promote the version they publish
(in the same commit) unless ``--no-promote``; ``promote`` serves any published version;
``rollback`` goes back to the version served before the current one (``Catalog.serving_stack``).
Each is one catalog commit under the writer lock, so a server polling the catalog sees one
consistent answer.

A running server holds a lease per version it still serves requests on (``leases/<server>.json``,
renewed every few seconds): ``mmer gc`` never removes a version a live lease names.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from mmer_dist.errors import InvalidInputError, StoreError
from mmer_dist.store.atomic import atomic_put
from mmer_dist.store.catalog import Catalog
from mmer_dist.store.store import Store, utc_now

LEASES = "leases"
LEASE_TTL_S = 60.0


def promote(url: str, version: int) -> Catalog:
    store = Store.open(url)
    with store.writer_lock():
        catalog = store.catalog()
        catalog.version(version)  # names the published ones when it is not
        if catalog.serving_stack()[-1:] == [version]:
            raise InvalidInputError(f"version {version} is already the served version")
        return store.commit(catalog.promoted(version, at=utc_now()), catalog.seq)


def rollback(url: str) -> tuple[int, int]:
    """Serve the version served before the current one; returns (from, to)."""
    store = Store.open(url)
    with store.writer_lock():
        catalog = store.catalog()
        stack = catalog.serving_stack()
        if len(stack) < 2:
            raise InvalidInputError("there is no earlier served version to roll back to"
                                    + (f" (version {stack[0]} is the first promoted)" if stack else
                                       " (no version was ever promoted)"))
        store.commit(catalog.promoted(stack[-2], action="rollback", at=utc_now()), catalog.seq)
        return stack[-1], stack[-2]


# -- leases of running servers ----------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    server: str
    versions: tuple[int, ...]
    renewed: float
    ttl: float

    @property
    def alive(self) -> bool:
        return time.time() - self.renewed < self.ttl


def live_leases(store: Store) -> list[Lease]:
    """Leases renewed within their ttl; an unreadable one is ignored (its server renews it)."""
    out = []
    for name in store.list_files(LEASES):
        try:
            data = json.loads(store.get_bytes(f"{LEASES}/{name}"))
            lease = Lease(str(data["server"]), tuple(int(v) for v in data["versions"]), float(data["renewed"]),
                          float(data["ttl"]))
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            continue
        if lease.alive:
            out.append(lease)
    return out


def leased_versions(store: Store) -> set[int]:
    return {v for lease in live_leases(store) for v in lease.versions}


class ServerLease:
    """What one server process holds, renewed on a daemon thread until ``release``."""

    def __init__(self, url: str, ttl: float = LEASE_TTL_S, server: str | None = None):
        self.url, self.ttl = url, ttl
        self.server = server or uuid.uuid4().hex[:16]
        self._versions: tuple[int, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, versions: Iterable[int]) -> None:
        self._versions = tuple(sorted(set(versions)))
        self._write()
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew, name="mmer-lease", daemon=True)
            self._thread.start()

    def _write(self) -> None:
        store = Store.open(self.url)
        record = {"server": self.server, "versions": list(self._versions), "renewed": time.time(), "ttl": self.ttl}
        atomic_put(store.fs, store.abspath(f"{LEASES}/{self.server}.json"), json.dumps(record).encode())

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._write()
            except (OSError, StoreError):  # the store is unreachable for a moment: try again
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            store = Store.open(self.url)
            store.remove(f"{LEASES}/{self.server}.json")
        except (OSError, StoreError):
            pass  # it expires by itself
