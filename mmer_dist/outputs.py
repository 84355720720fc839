"""Output directories that commands write (exports, the demo's workdir), and nothing else.

Rules: a command only replaces a directory it wrote itself, recognised by the marker file it
leaves there; it never deletes a store, a directory holding anything it did not write, or the
current directory's unrelated contents; a name read from a store is joined onto an output
directory only when it stays inside it.

- ``staged_output``: an export is written to a sibling staging directory (held by a file lock
  while it is written) and renamed into place when complete, with ``.mmer-export.json`` listing
  the files it wrote. ``--overwrite`` replaces only a directory whose marker lists all it holds.
  Staging left by a killed export (its lock free) is removed by the next export to that name.
- ``safe_join``: a relative file name from a store, checked, under an output directory.
- ``prepare_workdir``: the demo's working directory, emptied only when it is a previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from mmer_dist.errors import InvalidInputError
from mmer_dist.store.files import copy_files, safe_join  # noqa: F401  (safe_join: the name check, re-exported)

EXPORT_MARKER = ".mmer-export.json"
_STAGING_LOCK = ".mmer-staging.lock"


copy_store_files = copy_files  # store file names checked, bytes checked (mmer_dist/store/files.py)


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InvalidInputError(f"--out {out} names a file (or a link), not a directory; give a new or empty "
                                "directory")


def _previous_export(out: Path) -> list[str] | None:
    """The files of a previous export at ``out`` if everything in it is what that export wrote."""
    marker = out / EXPORT_MARKER
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir() or p.is_symlink())
    if sorted(set(listed) | {EXPORT_MARKER}) != present:
        return None
    return listed


def _remove_abandoned_staging(out: Path) -> None:
    """Staging directories of earlier exports to ``out`` whose writer is gone (lock free)."""
    for tmp in out.parent.glob(f".{out.name}.partial-*"):
        lock_path = tmp / _STAGING_LOCK
        if not tmp.is_dir() or tmp.is_symlink() or not lock_path.is_file():
            continue
        lock = FileLock(lock_path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a live export is writing it
        try:
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            lock.release()


@contextmanager
def staged_output(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging directory; on success it becomes ``out`` (replacing a previous export
    only when ``overwrite``), on failure it is removed and ``out`` is untouched."""
    out = Path(os.path.abspath(out))  # '.' has no name to put a sibling staging directory beside
    _check_out(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InvalidInputError(f"output directory {out} exists and is not empty (use --overwrite to replace "
                                    "a previous export)")
        if _previous_export(out) is None:
            raise InvalidInputError(f"--overwrite replaces only a previous export, and {out} is not one (no "
                                    f"{EXPORT_MARKER}, or it holds files no export wrote); give a new or empty "
                                    "directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(out)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    lock = FileLock(tmp / _STAGING_LOCK)
    lock.acquire()
    try:
        yield tmp
        lock.release()
        (tmp / _STAGING_LOCK).unlink(missing_ok=True)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
        (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "mmer export", "files": files}, indent=1))
        _swap_into_place(tmp, out)
    except BaseException:
        lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; a previous export is moved aside first and removed only after."""
    if not out.exists():
        tmp.rename(out)
        return
    if _previous_export(out) is None and any(out.iterdir()):  # changed since we checked
        raise InvalidInputError(f"{out} changed while the export ran and is no longer a previous export; "
                                "nothing was replaced")
    old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# -- the demo's working directory -------------------------------------------------------------

DEMO_MARKER = ".mmer-demo.json"


def prepare_workdir(workdir: str | Path, entries: tuple[str, ...]) -> Path:
    """Make ``workdir`` ready for a demo run: create it if new or empty; if it holds a previous
    run (its marker), remove only that run's own ``entries``; otherwise refuse."""
    workdir = Path(workdir)
    if workdir.is_symlink() or (workdir.exists() and not workdir.is_dir()):
        raise InvalidInputError(f"--workdir {workdir} names a file (or a link), not a directory")
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / DEMO_MARKER).is_file():
            raise InvalidInputError(f"--workdir {workdir} is not empty and was not made by `mmer demo` (no "
                                    f"{DEMO_MARKER}); give a new or empty directory — nothing was deleted")
        for name in entries:
            path = workdir / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DEMO_MARKER).write_text(json.dumps({"written_by": "mmer demo", "entries": list(entries)}))
    return workdir


