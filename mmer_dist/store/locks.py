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

How long a writer waits for a lock another writer holds is the command's ``--wait SECONDS``
(``lock_wait``, default ``DEFAULT_WAIT_S``): a writer about to finish is waited for, a longer one
makes the command fail with one line naming the lock, or, with a longer ``--wait``, wait its turn.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import os
import socket
import sys
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
DEFAULT_WAIT_S = 1.0  # commands' --wait default: a writer about to finish is waited for, no longer
LEASE_POLL_S = 0.5

# the current command's --wait: one setting for every lock it takes (an add takes two: ingest, merge)
_wait_s: contextvars.ContextVar[float] = contextvars.ContextVar("mmer_lock_wait", default=DEFAULT_WAIT_S)


@contextlib.contextmanager
def lock_wait(seconds: float) -> Iterator[None]:
    """Within this block, a writer lock held by another writer is waited for up to ``seconds``."""
    token = _wait_s.set(float(seconds))
    try:
        yield
    finally:
        _wait_s.reset(token)


@contextlib.contextmanager
def writer_lock(fs: fsspec.AbstractFileSystem, root: str, url: str) -> Iterator[None]:
    wait = _wait_s.get()
    if is_local(fs):
        with _file_lock(root, url, wait):
            yield
    else:
        with _lease_lock(fs, root, url, wait):
            yield


def _held(path: str, wait: float, holder: str = "") -> StoreError:
    waited = f" after waiting {wait:g}s" if wait > DEFAULT_WAIT_S else ""
    return StoreError(f"another writer (ingest, merge or gc{holder}) holds {path}{waited}; re-run once it has "
                      "finished, or give the command --wait SECONDS to wait for it")


def _say_waiting(path: str, wait: float) -> None:
    print(f"mmer: another writer holds {path}; waiting up to {wait:g}s for it (--wait)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(root: str, url: str, wait: float) -> Iterator[None]:
    from filelock import FileLock, Timeout

    path = f"{root}/{LOCK_NAME}"
    lock = FileLock(path)
    try:
        try:
            lock.acquire(timeout=min(wait, DEFAULT_WAIT_S))
        except Timeout:
            if wait <= DEFAULT_WAIT_S:
                raise
            _say_waiting(path, wait)
            lock.acquire(timeout=wait - DEFAULT_WAIT_S)
    except Timeout:
        raise _held(path, wait) from None
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
def _lease_lock(fs: fsspec.AbstractFileSystem, root: str, url: str, wait: float) -> Iterator[None]:
    path = f"{root}/{LOCK_NAME}"
    run = uuid.uuid4().hex
    _take_lease(fs, path, run, wait)
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


def _take_lease(fs: fsspec.AbstractFileSystem, path: str, run: str, wait: float) -> None:
    """Create the lease object; while a live writer holds it, poll until ``wait`` seconds passed."""
    root = path.rsplit("/", 1)[0]
    deadline = time.monotonic() + wait
    said = False
    for attempt in itertools.count():
        try:
            create_exclusive(fs, path, json.dumps(_lease_record(run)).encode())
            return
        except FileExistsError:
            lease = read_lease(fs, root)
        if lease is None:
            pass  # released meanwhile: try again
        elif (age := time.time() - float(lease["renewed"])) >= LEASE_SECONDS:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)  # a dead writer's lease; the exclusive create decides between breakers
        elif time.monotonic() < deadline:
            if not said and wait > DEFAULT_WAIT_S:
                _say_waiting(path, wait)
                said = True
            time.sleep(min(LEASE_POLL_S, max(0.0, deadline - time.monotonic())))
        else:
            raise _held(path, wait, f": pid {lease.get('pid')} on host {lease.get('host')}, alive {age:.0f}s "
                        "ago") from None
        if attempt >= 2 and time.monotonic() >= deadline:
            raise StoreError(f"another writer took {path} at the same moment; re-run once it has finished")
