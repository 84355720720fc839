"""The writer lock: one writer (ingest, merge, gc) at a time on a store, on every backend.

- Local disk: an OS file lock (``flock`` through filelock) on ``<root>/.writer.lock``. The OS
  drops it when its holder dies, so a killed writer never leaves the store locked, and holding
  it proves that no other writer is alive: under it, any staging found is abandoned.
- Object stores (S3, GCS, fsspec memory): a lease object ``<root>/.writer.lock`` taken by
  exclusive creation (If-None-Match / ifGenerationMatch=0) and renewed by its holder every
  ``RENEW_SECONDS``. A lease not renewed for ``LEASE_SECONDS`` belongs to a dead writer and may
  be broken; breaking it is itself an exclusive create, so two writers never both take it.

Whatever the lock, the catalog commit is still an exclusive create: even a writer whose lease
was wrongly broken can never publish over another's commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import fsspec

from mmer_dist.errors import StoreError
from mmer_dist.store.atomic import atomic_put, create_exclusive, is_local

LOCK_NAME = ".writer.lock"
LEASE_SECONDS = 120.0
RENEW_SECONDS = 15.0


@contextlib.contextmanager
def writer_lock(fs: fsspec.AbstractFileSystem, root: str, url: str) -> Iterator[None]:
    if is_local(fs):
        with _file_lock(root, url):
            yield
    else:
        with _lease_lock(fs, root, url):
            yield


@contextlib.contextmanager
def _file_lock(root: str, url: str) -> Iterator[None]:
    from filelock import FileLock, Timeout

    path = f"{root}/{LOCK_NAME}"
    lock = FileLock(path)
    try:
        lock.acquire(timeout=1)
    except Timeout:
        raise StoreError(f"another writer (ingest, merge or gc) holds {path}; re-run once it has finished") from None
    except PermissionError:
        raise StoreError(f"store {url!r} is read-only for this user (cannot create {path}); "
                         "writing commands need write access, reading ones (status, export, verify) do not") from None
    except OSError as e:
        raise StoreError(f"cannot take the writer lock {path}: {e.strerror or e}") from None
    try:
        yield
    finally:
        lock.release()


def _lease_record(run: str) -> dict:
    return {"run": run, "host": socket.gethostname(), "pid": os.getpid(), "renewed": time.time()}


def read_lease(fs: fsspec.AbstractFileSystem, root: str) -> dict | None:
    """The current lease (None if there is none); an unreadable one counts as renewed long ago."""
    try:
        data = fs.cat_file(f"{root}/{LOCK_NAME}")
    except FileNotFoundError:
        return None
    try:
        lease = json.loads(data)
        float(lease["renewed"])
        return lease
    except (ValueError, KeyError, TypeError):
        return {"run": "?", "host": "?", "pid": "?", "renewed": 0.0}


@contextlib.contextmanager
def _lease_lock(fs: fsspec.AbstractFileSystem, root: str, url: str) -> Iterator[None]:
    path = f"{root}/{LOCK_NAME}"
    run = uuid.uuid4().hex
    _take_lease(fs, path, run)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_SECONDS):
            try:
                lease = read_lease(fs, root)
                if lease is None or lease.get("run") != run:
                    return  # broken by someone who judged us dead; our commit will fail cleanly
                atomic_put(fs, path, json.dumps(_lease_record(run)).encode())
            except OSError:
                pass  # try again at the next beat; the lease lasts several beats

    beat = threading.Thread(target=renew, name="mmer-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError):
            lease = read_lease(fs, root)
            if lease is not None and lease.get("run") == run:
                fs.rm(path)


def _take_lease(fs: fsspec.AbstractFileSystem, path: str, run: str) -> None:
    root = path.rsplit("/", 1)[0]
    for _ in range(2):
        try:
            create_exclusive(fs, path, json.dumps(_lease_record(run)).encode())
            return
        except FileExistsError:
            lease = read_lease(fs, root)
            if lease is None:
                continue  # released meanwhile
            age = time.time() - float(lease["renewed"])
            if age < LEASE_SECONDS:
                raise StoreError(f"another writer (ingest, merge or gc: pid {lease.get('pid')} on host "
                                 f"{lease.get('host')}, alive {age:.0f}s ago) holds {path}; re-run once it has "
                                 "finished") from None
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)  # a dead writer's lease; the exclusive create below decides between breakers
    raise StoreError(f"another writer took {path} at the same moment; re-run once it has finished")
