"""``Store``: the public face of a store on a local path or any fsspec URL.

It opens or creates the zarr hierarchy, reads and commits catalog snapshots, and reads and
writes row blocks of tensor arrays and plain files by their layout paths. It does no merge
math and knows nothing of checkpoint formats.

Integrity: every array's codec pipeline ends in zarr's crc32c codec (a damaged chunk fails its
checksum when read), every chunk is written even when it is all zeros, and reads go through a
zarr store that raises on a missing chunk instead of returning the fill value. Both surface as
a StoreError naming the array and the chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import datetime as _dt
import json
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import torch
import zarr
import zarr.core.array
import zarr.core.sync
import zarr.storage
from zarr.codecs import Crc32cCodec, ZstdCodec

from mmer_dist.errors import InvalidInputError, StoreError
from mmer_dist.store import layout
from mmer_dist.store.atomic import is_local
from mmer_dist.store.catalog import Catalog, read_catalog, write_catalog
from mmer_dist.store.chunk_files import ChunkFiles
from mmer_dist.store.chunks import StrictChunkStore, chunk_errors
from mmer_dist.store.locks import writer_lock
from mmer_dist.store.mapped import MappedStack

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_model_id(model_id: str) -> None:
    if not _MODEL_ID.match(model_id or ""):
        raise InvalidInputError(
            f"model id {model_id!r} is not valid: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ArraySpec:
    """An array to create: (rows, cols) in row blocks, or (lead, rows, cols) with ``lead``."""

    path: str
    rows: int
    cols: int
    rows_per_chunk: int
    dtype: str
    compress: bool = False
    lead: int | None = None


def _array_kwargs(spec: ArraySpec) -> dict:
    shape, chunks = (spec.rows, spec.cols), (spec.rows_per_chunk, spec.cols)
    if spec.lead is not None:
        shape, chunks = (spec.lead,) + shape, (spec.lead,) + chunks
    return dict(
        name=spec.path, shape=shape, chunks=chunks, dtype=layout.storage_dtype(spec.dtype), fill_value=0,
        overwrite=True,
        # level 1: ~1.3 GB/s on 2 cores; pays 3-7x on sparse masks, costs ~nothing on dense ones.
        # crc32c last: the checksum covers the bytes as stored, checked before decoding.
        compressors=[ZstdCodec(level=1), Crc32cCodec()] if spec.compress else [Crc32cCodec()],
        attributes={"dtype": spec.dtype}, config=_ARRAY_CONFIG)


def _unchecked(verified: set | None, path: str, start: int) -> bool:
    """Whether a chunk file's checksum is still to be checked (``Store.read_stacked``)."""
    return verified is None or (path, start) not in verified


def _node_type(metadata_file: str) -> str | None:
    try:
        with open(metadata_file, "rb") as f:
            return json.load(f).get("node_type")
    except (OSError, ValueError, AttributeError):
        return None


class Store:
    """A handle on one store. Cheap to create; pass the URL to other processes and reopen."""

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, root: str, group: zarr.Group):
        self.url = os.fspath(url) if isinstance(url, os.PathLike) else url
        self.fs = fs
        self.root = root
        self.group = group
        self._checked = StrictChunkStore(group.store)  # reads: a missing chunk raises
        self._arrays: dict[str, zarr.Array] = {}
        self._read_arrays: dict[str, zarr.Array] = {}
        # local stores: whole chunks read and written as files, past zarr (``chunk_files``)
        self._chunk_files: dict[str, ChunkFiles | None] = {}
        self._local_root = root if is_local(fs) else None

    @property
    def is_local(self) -> bool:
        """On a local file system (chunk files are read, written and mapped directly)."""
        return self._local_root is not None

    # -- opening -----------------------------------------------------------------------------

    @staticmethod
    def _connect(url: str):
        fs, root = connect(url)
        if is_local(fs):
            zstore = zarr.storage.LocalStore(root)
        elif getattr(fs, "async_impl", False):
            # zarr runs its I/O on its own event loop: it needs an instance made for async use
            # (the sync one is bound to fsspec's loop); same options, a separate instance
            zstore = zarr.storage.FsspecStore(fs=type(fs)(**fs.storage_options, asynchronous=True,
                                                          skip_instance_cache=True), path=root)
        else:
            zstore = zarr.storage.FsspecStore(fs=_async_fs(fs), path=root)
        return fs, root, zstore

    @classmethod
    def open(cls, url: str) -> Store:
        fs, root, zstore = cls._connect(url)
        if not fs.exists(f"{root}/zarr.json"):
            raise StoreError(f"{url!r} is not an mmer store (no zarr.json); create one with "
                             "`mmer ingest --store URL --base PATH`")
        try:
            group = zarr.open_group(zstore, mode="r+")
        except Exception as e:  # a zarr array, or unreadable metadata: not ours either
            raise StoreError(f"{url!r} is not an mmer store: its zarr.json does not describe a zarr group "
                             f"({type(e).__name__}: {e})") from None
        found = group.attrs.get(layout.STORE_MARKER)
        if found == 1:
            raise StoreError(f"{url!r} is an mmer store of layout 1, written before chunk checksums and "
                             f"exclusive catalog commits; this version reads layout {layout.STORE_LAYOUT_VERSION}. "
                             "Export what you need with the older mmer (`mmer export --original`) and ingest it "
                             "into a new store")
        if found != layout.STORE_LAYOUT_VERSION:
            raise StoreError(f"{url!r} is a zarr group but not an mmer store (layout {found!r})")
        return cls(url, fs, root, group)

    @classmethod
    def create(cls, url: str) -> Store:
        fs, root, zstore = cls._connect(url)
        if fs.exists(root) and fs.ls(root):
            if fs.exists(f"{root}/zarr.json"):
                raise StoreError(f"{url!r} already holds a store")
            raise StoreError(f"{url!r} exists and is not empty; a new store needs an empty or new path")
        group = zarr.open_group(zstore, mode="w", attributes={layout.STORE_MARKER: layout.STORE_LAYOUT_VERSION})
        return cls(url, fs, root, group)

    @classmethod
    def exists(cls, url: str) -> bool:
        fs, root = connect(url)
        return fs.exists(f"{root}/zarr.json")

    def __reduce__(self):  # reopen from the URL in other processes (Ray workers)
        return (Store.open, (self.url,))

    # -- catalog ---------------------------------------------------------------------------------

    def catalog(self) -> Catalog:
        return read_catalog(self.fs, self.root)

    def commit(self, catalog: Catalog, expected_seq: int) -> Catalog:
        return write_catalog(self.fs, self.root, catalog, expected_seq)

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Serialise writers (ingest, merge, gc) on every backend (``store/locks.py``)."""
        with writer_lock(self.fs, self.root, self.url):
            yield

    # -- arrays ----------------------------------------------------------------------------------

    def create_array(self, path: str, rows: int, cols: int, rows_per_chunk: int, dtype: str,
                     compress: bool = False, lead: int | None = None) -> None:
        """An empty (rows, cols) array chunked in row blocks; with ``lead`` = N, an (N, rows, cols)
        array whose chunks hold the same row block of all N (one object, one write per chunk)."""
        self.create_arrays([ArraySpec(path, rows, cols, rows_per_chunk, dtype, compress, lead)])

    def create_arrays(self, specs: list[ArraySpec]) -> None:
        """Many empty arrays (see ``create_array``) in one trip through zarr's event loop: one
        trip per array costs a thread wake-up and a GIL hand-over each (a 7B model has ~290).

        On a local store zarr builds the metadata in memory and the documents are written here
        (``_write_metadata``): through its local store each array also checks that no node
        exists at it or any parent and rewrites the parents, ~10 file operations per array, 0.4 s
        of a 100M-parameter merge's 3 s."""
        for spec in specs:
            self._arrays.pop(spec.path, None)
            self._read_arrays.pop(spec.path, None)
            self._chunk_files.pop(spec.path, None)
        if self._local_root is not None:
            documents: dict = {}
            self._create_in(zarr.storage.MemoryStore(store_dict=documents), specs)
            self._write_metadata(documents, {spec.path for spec in specs})
        else:
            self._create_in(self.group.store, specs)

    def _write_metadata(self, documents: dict, arrays: set[str]) -> None:
        """Publish zarr's metadata documents (``<node>/zarr.json`` -> buffer) under the local
        root: each array's replaces what was at its path (zarr's ``overwrite``), a group's is
        written only where none exists (the store's own groups keep their attributes)."""
        for key, buffer in sorted(documents.items(), key=lambda kv: kv[0].count("/")):
            node = key.rsplit("/", 1)[0] if "/" in key else ""
            path = f"{self._local_root}/{key}"
            if node in arrays:
                if os.path.isdir(f"{self._local_root}/{node}"):
                    shutil.rmtree(f"{self._local_root}/{node}")
            elif os.path.exists(path):
                if _node_type(path) != "group":  # zarr refuses arrays inside arrays, so do we
                    raise StoreError(f"cannot create arrays under {node!r} in {self.url!r}: it is not a zarr group")
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.partial"
            with open(tmp, "wb") as f:
                f.write(buffer.to_bytes())
            os.replace(tmp, path)

    @staticmethod
    def _create_in(store, specs: list[ArraySpec]) -> None:
        finished = threading.Event()

        async def create_all():
            try:  # every creation runs to its end, so none writes after this method returns
                return await asyncio.gather(*(zarr.core.array.create_array(store, **_array_kwargs(spec))
                                              for spec in specs), return_exceptions=True)
            finally:
                finished.set()

        try:
            created = zarr.core.sync.sync(create_all())
        except BaseException:
            # Ctrl-C while zarr's loop thread is still writing metadata: let it finish first, so
            # that the caller's clean-up removes everything instead of racing those writes
            finished.wait(timeout=60)
            raise
        errors = [c for c in created if isinstance(c, BaseException)]
        if errors:
            raise errors[0]

    def array(self, path: str) -> zarr.Array:
        arr = self._arrays.get(path)
        if arr is None:
            arr = self._open_array(self.group.store, path)
            self._arrays[path] = arr
        return arr

    def _open_array(self, zstore, path: str) -> zarr.Array:
        try:
            # (open_array takes no runtime config: it is set on the opened array)
            return zarr.open_array(zstore, path=path, mode="r+", zarr_format=3).with_config(_ARRAY_CONFIG)
        except FileNotFoundError:
            raise StoreError(f"array {path!r} is missing from store {self.url!r}") from None
        except (ValueError, TypeError, KeyError) as e:  # unreadable zarr.json
            raise StoreError(f"array {path!r} of store {self.url!r} has damaged metadata ({e})") from None

    def checked_array(self, path: str) -> zarr.Array:
        """The array for reading: a missing chunk raises MissingChunkError, never reads as zeros."""
        arr = self._read_arrays.get(path)
        if arr is None:
            arr = self._open_array(self._checked, path)
            self._read_arrays[path] = arr
        return arr

    def read(self, path: str, *index) -> torch.Tensor:
        """``array[index]`` as a tensor in its logical dtype."""
        arr = self.checked_array(path)
        with chunk_errors(self.url, path, arr, index):
            data = arr[index]
        return layout.from_storage(data, arr.attrs["dtype"])

    def write(self, path: str, block: torch.Tensor, *index) -> None:
        self.array(path)[index] = layout.to_storage(block)

    def write_chunk(self, path: str, start: int, block: torch.Tensor, direct: bool = False) -> None:
        """Write one whole chunk (rows [start, start + block rows) of every leading index, all
        columns): straight to its file on a local store (``chunk_files``; ``direct``: past the
        page cache, for output not read back soon), else through zarr."""
        files = self._files(path)
        rows = block.shape[-2]
        if files is not None and files.is_one_chunk(start, start + rows):
            files.write(start, layout.to_storage(block), direct)
            return
        index = (slice(None),) * (block.dim() - 2) + (slice(start, start + rows),)
        self.write(path, block, *index)

    def read_rows(self, path: str, start: int, stop: int) -> torch.Tensor:
        return self.read(path, slice(start, stop))

    def write_rows(self, path: str, start: int, block: torch.Tensor) -> None:
        self.write(path, block, slice(start, start + block.shape[0]))

    def read_stacked(self, paths: list[str], start: int, stop: int, buffer: torch.Tensor | None = None,
                     stack: MappedStack | None = None, verified: set | None = None) -> torch.Tensor:
        """Rows [start, stop) of several (rows, cols) arrays on one chunk grid, stacked
        (len(paths), stop - start, cols) in one buffer, in their common logical dtype (float32,
        exactly, when the arrays' dtypes differ). Whole local uncompressed chunks are mapped
        side by side into ``stack`` where their bytes are whole pages (no copy, ``mapped``), or
        read straight into the buffer (``chunk_files``); anything else through zarr. ``buffer``,
        a flat uint8 tensor at least that large, is reused instead of allocating one.

        ``verified``: (path, start) of chunk files whose checksum this caller has checked; they
        are not checked again, and the ones checked now are added. For a reader of immutable
        files that reads each several times (a merge's passes, under the writer lock)."""
        dtypes = [self.array_dtype(p) for p in paths]
        if len(set(dtypes)) > 1:  # e.g. fp16 and bf16 fine-tunes: every value is exact in float32
            return torch.stack([self.read_rows(p, start, stop).float() for p in paths])
        first = self._files(paths[0])
        cols = first.cols if first is not None else self.array(paths[0]).shape[1]
        shape, dtype = (len(paths), stop - start, cols), layout.storage_torch_dtype(dtypes[0])
        nbytes = math.prod(shape) * dtype.itemsize
        if stack is not None and nbytes <= stack.capacity:
            mapped = self._map_stacked(paths, start, stop, stack, nbytes // len(paths), verified)
            if mapped is not None:
                return layout.from_storage_tensor(mapped.view(dtype).view(shape), dtypes[0])
        if buffer is not None and buffer.numel() >= nbytes:
            out = buffer[:nbytes].view(dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=dtype)
        view = out.numpy()
        for i, p in enumerate(paths):
            files = self._files(p)
            if files is not None and files.leading_axes == 0 and files.is_one_chunk(start, stop):
                files.read_into(start, view[i], verify=_unchecked(verified, p, start))
                if verified is not None:
                    verified.add((p, start))
            else:
                view[i] = layout.to_storage(self.read_rows(p, start, stop))
        return layout.from_storage_tensor(out, dtypes[0])

    def _map_stacked(self, paths: list[str], start: int, stop: int, stack: MappedStack, slot: int,
                     verified: set | None) -> torch.Tensor | None:
        """The stacked chunk mapped into ``stack``, or None where a file does not qualify (then
        the caller copies). A refused mapping (e.g. the system's map limit) also means None."""
        files = [self._files(p) for p in paths]
        if not all(f is not None and f.is_one_chunk(start, stop) and f.can_map(slot) for f in files):
            return None
        try:
            for i, (p, f) in enumerate(zip(paths, files)):
                f.map_into(start, stack, i * slot, slot, verify=_unchecked(verified, p, start))
        except OSError:
            return None
        if verified is not None:
            verified.update((p, start) for p in paths)
        return stack.tensor(slot * len(paths))

    def _files(self, path: str) -> ChunkFiles | None:
        if path not in self._chunk_files:
            files = None
            if self._local_root is not None:
                files = ChunkFiles.read_metadata(f"{self._local_root}/{path}")
                if files is None and not self.exists_path(f"{path}/zarr.json"):
                    raise StoreError(f"array {path!r} is missing from store {self.url!r}")
            self._chunk_files[path] = files
        return self._chunk_files[path]

    def write_rows(self, path: str, start: int, block: torch.Tensor) -> None:
        self.write(path, block, slice(start, start + block.shape[0]))

    def array_dtype(self, path: str) -> str:
        files = self._files(path)
        return files.dtype if files is not None else self.array(path).attrs["dtype"]

    # -- plain paths -------------------------------------------------------------------------------

    def abspath(self, path: str) -> str:
        return f"{self.root}/{path}"

    def exists_path(self, path: str) -> bool:
        return self.fs.exists(self.abspath(path))

    def remove(self, path: str) -> None:
        """Delete a subtree (arrays or files); used for staging and orphan clean-up only."""
        for cache in (self._arrays, self._read_arrays, self._chunk_files):
            for p in [k for k in cache if k == path or k.startswith(path + "/")]:
                del cache[p]
        if self.exists_path(path):
            self.fs.rm(self.abspath(path), recursive=True)

    def put_bytes(self, path: str, data: bytes) -> None:
        self.fs.makedirs(self.abspath(path).rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(self.abspath(path), data)

    def get_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(self.abspath(path))

    def open_file(self, path: str, mode: str = "rb"):
        if "w" in mode:
            self.fs.makedirs(self.abspath(path).rsplit("/", 1)[0], exist_ok=True)
        return self.fs.open(self.abspath(path), mode)

    def list_files(self, path: str) -> list[str]:
        if not self.exists_path(path):
            return []
        prefix = self.abspath(path) + "/"
        return sorted(p[len(prefix):] for p in self.fs.find(self.abspath(path)))

    def disk_usage(self, path: str) -> int:
        if not self.exists_path(path):
            return 0
        return int(self.fs.du(self.abspath(path)))


# every chunk is written, zeros included: a chunk that is not there is then always damage
_ARRAY_CONFIG = {"write_empty_chunks": True}


def connect(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) of a store URL, with a clear error for an unknown scheme or a
    filesystem package that is not installed."""
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url.strip():
        raise InvalidInputError(f"store location {url!r} is empty")
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise StoreError(f"store {url!r}: unknown URL scheme {scheme!r} (use a local path, s3://, gs:// or "
                         "another fsspec filesystem)") from None
    except ImportError as e:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(scheme)
        hint = f"install it with `pip install 'mmer-dist[{extra}]'`" if extra else f"install what it needs ({e})"
        raise StoreError(f"store {url!r}: the {scheme}:// filesystem is not installed; {hint}") from None
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ValueError, TypeError) as e:
        raise StoreError(f"store {url!r}: {e}") from None
    return fs, root.rstrip("/")


def _async_fs(fs: fsspec.AbstractFileSystem):
    """zarr's FsspecStore needs an async filesystem; wrap sync ones (e.g. memory://)."""
    if getattr(fs, "async_impl", False):
        return fs
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return AsyncFileSystemWrapper(fs)

