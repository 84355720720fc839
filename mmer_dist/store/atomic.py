"""The two atomic primitives every store backend offers, and all that commits rely on.

- ``create_exclusive``: create an object only if nothing exists at that path, all or nothing.
  That is the commit point of a catalog snapshot and the way a lock is taken on object stores.
  Local disk: write a temporary file, fsync, then ``os.link`` it into place (link fails with
  EEXIST when the name is taken, and readers never see a partial file). S3: PutObject with
  ``If-None-Match: *``; GCS: ``ifGenerationMatch=0``; fsspec's memory filesystem: exclusive open.
  All three are what fsspec's ``pipe_file(..., mode="create")`` sends, and each raises
  FileExistsError when the object exists.
- ``atomic_put``: replace a small object so a reader sees the old or the new bytes, never a mix
  (rename on local disk; a single PUT is atomic on object stores).
"""

from __future__ import annotations

import os
import uuid

import fsspec


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create ``path`` holding ``data``; FileExistsError if anything is already there."""
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # atomic, and fails if the name exists
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        return
    fs.pipe_file(path, data, mode="create")


def atomic_put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace one small object atomically."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        return
    fs.pipe_file(path, data)
