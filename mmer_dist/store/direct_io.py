"""New files written past the page cache (``O_DIRECT``), for output nobody reads back soon.

A merge writes tau* (float32: twice the bytes of a bf16 model) and the masks of every chunk into
the new version; the server reads them later, once. Written through the page cache, each byte is
copied into a freshly allocated page, which the kernel first takes from other cached files (on a
busy host: the model chunks the merge itself is reading) and then writes back: on a 2-core VM
about 1 s of CPU for a 100M-parameter version, half a merge's write thread. With ``O_DIRECT``
the device reads the bytes straight from this process's memory: no copy, nothing evicted.

Direct I/O needs block-aligned memory, offsets and lengths, so the bytes are staged in a
page-aligned per-thread buffer (one memcpy, ~10 GB/s), the aligned prefix is written directly
and the few bytes after it (a chunk's checksum) through the page cache. File systems that refuse
direct I/O (``EINVAL``, e.g. some tmpfs and overlay mounts) get ordinary writes; the bytes in the
file are the same either way.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading

BLOCK = 4096  # a multiple of every common logical block size
_DIRECT = getattr(os, "O_DIRECT", 0)
_local = threading.local()
_refused: set[int] = set()  # st_dev of file systems that refused O_DIRECT (checked once each)
_REFUSALS = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}  # how a file system says "not here"


def _staging(nbytes: int) -> mmap.mmap:
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < nbytes:
        if buf is not None:
            buf.close()
        buf = _local.buf = mmap.mmap(-1, max(BLOCK, -(-nbytes // BLOCK) * BLOCK))  # page aligned
    return buf


def create_file(path: str, parts: list, direct: bool = False) -> None:
    """Create ``path`` (it must not exist) holding the concatenation of ``parts`` (bytes-like).

    ``direct``: bypass the page cache where the file system allows it. The caller publishes the
    file (rename) and removes it if this raises.
    """
    views = [memoryview(p).cast("B") for p in parts]
    size = sum(len(v) for v in views)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if direct and _DIRECT and size >= BLOCK and os.stat(os.path.dirname(path) or ".").st_dev not in _refused:
        try:
            fd = os.open(path, flags | _DIRECT, 0o644)
        except OSError as e:
            if e.errno not in _REFUSALS:
                raise
            _refused.add(os.stat(os.path.dirname(path) or ".").st_dev)
        else:
            try:
                _write_direct(fd, views, size)
            finally:
                os.close(fd)
            return
    fd = os.open(path, flags, 0o644)
    try:
        for v in views:
            _write_all(fd, v)
    finally:
        os.close(fd)


def _write_direct(fd: int, views: list[memoryview], size: int) -> None:
    buf = _staging(size)
    at = 0
    for v in views:
        buf[at:at + len(v)] = v
        at += len(v)
    whole = memoryview(buf)[:size]
    aligned = size - size % BLOCK
    try:
        _write_all(fd, whole[:aligned])
    except OSError as e:  # alignment the device still refuses: write it all through the cache
        if e.errno not in _REFUSALS:
            raise
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_DIRECT)
        os.lseek(fd, 0, os.SEEK_SET)
        _write_all(fd, whole)
        return
    if aligned < size:  # the unaligned rest through the page cache
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_DIRECT)
        _write_all(fd, whole[aligned:])


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]
