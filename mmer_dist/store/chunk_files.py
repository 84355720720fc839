"""Whole chunks of local arrays, read into and written from the caller's buffers directly.

zarr moves one chunk through an event loop, thread hops and two copies (file bytes, then the
decoded array), opens each array by parsing its metadata through the same machinery, and scans
every chunk it writes for the fill value. A merge reads the same chunk of N + 1 arrays for every
chunk of the model (twice) and writes tau* and the masks of each; that path took about two
thirds of a merge's time. Where the layout allows, this module does the same I/O itself:

- metadata: the array's ``zarr.json`` parsed once (shape, chunk rows, codecs, dtype attribute);
- reads: one positioned read of the chunk file straight into its slot of the stacked buffer;
- writes: the chunk encoded (zstd if the array is compressed) and published with write to a
  temporary file + rename, as zarr's own local store does, so a reader never sees a torn chunk.

It serves local stores, zarr v3 arrays chunked in whole rows whose codecs are ``bytes``
(little-endian), optionally ``zstd``, optionally ``crc32c`` last (computed on write, verified on
read), and requests for exactly one chunk. Anything else goes through zarr. Every chunk is written
when its array is filled (zeros included), so a chunk file that is not there is damage: reading
it raises, as the store's checked zarr reads do.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass

import numpy as np

from mmer_dist.errors import StoreError
from mmer_dist.store import direct_io, mapped


@dataclass(frozen=True)
class ChunkFiles:
    """Where one array's chunks lie on a local disk and how they are encoded."""

    directory: str
    leading_axes: int  # axes before (rows, cols), wholly inside every chunk (masks: the N models)
    lead: int  # entries of those axes (1 for a 2-D array)
    rows: int
    cols: int
    rows_per_chunk: int
    itemsize: int
    dtype: str  # the logical dtype (the array's "dtype" attribute)
    separator: str
    zstd_level: int | None
    checksum: bool

    @classmethod
    def read_metadata(cls, directory: str) -> ChunkFiles | None:
        """From ``directory/zarr.json``; None when the array needs zarr's general path."""
        try:
            with open(f"{directory}/zarr.json", "rb") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        try:
            shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
            if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or len(shape) not in (2, 3):
                return None
            *lead, rows, cols = shape
            keys = meta["chunk_key_encoding"]
            if (meta["chunk_grid"]["name"] != "regular" or keys["name"] != "default" or chunks[-1] != cols
                    or list(chunks[:-2]) != lead):
                return None
            rpc = chunks[-2]
            if meta.get("fill_value") not in (0, 0.0) or meta.get("storage_transformers"):
                return None
            codecs = [(c["name"], c.get("configuration", {})) for c in meta["codecs"]]
            if not codecs or codecs[0][0] != "bytes" or codecs[0][1].get("endian", "little") != "little":
                return None
            rest = [name for name, _ in codecs[1:]]
            checksum = bool(rest) and rest[-1] == "crc32c"
            if checksum:
                rest = rest[:-1]
            zstd_level = None
            if rest == ["zstd"]:
                config = codecs[1][1]
                if config.get("checksum"):
                    return None
                zstd_level = int(config.get("level", 0))
            elif rest:
                return None
            itemsize = np.dtype(meta["data_type"]).itemsize
            logical = meta.get("attributes", {}).get("dtype", meta["data_type"])
            return cls(directory, len(lead), int(np.prod(lead, dtype=np.int64)), rows, cols, rpc, itemsize, logical,
                       keys.get("configuration", {}).get("separator", "/"), zstd_level, checksum)
        except (KeyError, TypeError, ValueError):
            return None

    def is_one_chunk(self, start: int, stop: int) -> bool:
        return start % self.rows_per_chunk == 0 and stop == min(self.rows, start + self.rows_per_chunk)

    def _file(self, start: int) -> str:
        sep = self.separator
        index = ["0"] * self.leading_axes + [str(start // self.rows_per_chunk), "0"]
        return f"{self.directory}/c{sep}{sep.join(index)}"

    @property
    def _padded_bytes(self) -> int:
        # zarr stores an edge chunk padded to the full chunk shape (per leading index)
        return self.lead * self.rows_per_chunk * self.cols * self.itemsize

    # -- reading ---------------------------------------------------------------------------------

    def read_into(self, start: int, out: np.ndarray, verify: bool = True) -> None:
        """Read the chunk starting at row ``start`` into ``out`` (its rows x cols, contiguous; 2-D
        arrays only: there an edge chunk's padding follows the rows asked for). ``verify``: check
        its checksum (a caller that checked this chunk file before may skip it)."""
        if self.leading_axes:
            raise ValueError("read_into reads 2-D arrays")
        file = self._file(start)
        fd = self._open(file)
        try:
            size = os.fstat(fd).st_size
            if self.zstd_level is not None:
                raw = _pread_all(fd, size, file)
                self._decode_into(raw, out, file)
                return
            self._check_size(size, file)
            view = memoryview(out.reshape(-1).view(np.uint8))
            tail = bytearray(size - out.nbytes)
            _preadv_all(fd, [view] + ([memoryview(tail)] if tail else []), size, file)
        finally:
            os.close(fd)
        if verify:
            self._verify(view, tail, file)

    def can_map(self, nbytes: int) -> bool:
        """Whether ``map_into`` serves a read of this chunk's first ``nbytes``."""
        return not self.leading_axes and self.zstd_level is None and mapped.page_aligned(nbytes)

    def map_into(self, start: int, stack: mapped.MappedStack, offset: int, nbytes: int, verify: bool = True) -> None:
        """``read_into`` without the copy: map the chunk's first ``nbytes`` (its rows; a whole
        number of pages) read-only at ``offset`` of ``stack``, with the same size and checksum
        checks (the padding of an edge chunk and the checksum are read into a small buffer)."""
        file = self._file(start)
        fd = self._open(file)
        try:
            size = os.fstat(fd).st_size
            self._check_size(size, file)
            stack.map_file(fd, offset, nbytes)
            tail = bytearray(size - nbytes)
            if tail:
                got = os.preadv(fd, [memoryview(tail)], nbytes)
                if got != len(tail):
                    raise StoreError(f"chunk file {file} ended early while being read")
        finally:
            os.close(fd)
        if verify:
            self._verify(stack.view(offset + nbytes)[offset:], tail, file)

    def _open(self, file: str) -> int:
        try:
            return os.open(file, os.O_RDONLY)
        except FileNotFoundError:  # every chunk is written at creation: a missing one is damage
            raise StoreError(f"chunk file {file} is missing (the store is damaged; `mmer verify` lists what)") from None

    def _check_size(self, size: int, file: str) -> None:
        if size != self._padded_bytes + 4 * self.checksum:
            raise StoreError(f"chunk file {file} holds {size} bytes, expected "
                             f"{self._padded_bytes + 4 * self.checksum} (truncated or corrupt)")

    def _verify(self, data, tail: bytearray, file: str) -> None:
        """Check the stored checksum of ``data`` + ``tail`` (the tail ends with it)."""
        if self.checksum:
            import google_crc32c

            crc = google_crc32c.extend(google_crc32c.value(np.frombuffer(data, dtype=np.uint8)), bytes(tail[:-4]))
            if np.uint32(crc).tobytes() != bytes(tail[-4:]):
                raise StoreError(f"chunk file {file}: checksum mismatch (corrupt chunk)")

    def _decode_into(self, raw: bytes, out: np.ndarray, file: str) -> None:
        if self.checksum:
            raw = _strip_checksum(raw, file)
        from numcodecs import Zstd

        data = Zstd().decode(raw)
        if len(data) != self._padded_bytes:
            raise StoreError(f"chunk file {file} decodes to {len(data)} bytes, expected {self._padded_bytes}")
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8, count=out.nbytes)

    # -- writing ---------------------------------------------------------------------------------

    def write(self, start: int, block: np.ndarray, direct: bool = False) -> None:
        """Write ``block`` ([lead axes,] the chunk's rows, cols) as the chunk starting at row
        ``start``; ``direct``: past the page cache (``direct_io``), for output read back later."""
        block = np.ascontiguousarray(block)
        rows = block.shape[-2]
        if rows != self.rows_per_chunk:  # an edge chunk: pad each leading index's rows
            padded = np.zeros(block.shape[:-2] + (self.rows_per_chunk, self.cols), dtype=block.dtype)
            padded[..., :rows, :] = block
            block = padded
        data = block.reshape(-1).view(np.uint8)
        if self.zstd_level is not None:
            from numcodecs import Zstd

            data = np.frombuffer(Zstd(level=self.zstd_level).encode(data), dtype=np.uint8)
        parts = [memoryview(data)]
        if self.checksum:
            import google_crc32c

            parts.append(memoryview(np.uint32(google_crc32c.value(data)).tobytes()))
        file = self._file(start)
        os.makedirs(os.path.dirname(file), exist_ok=True)
        tmp = f"{file}.{uuid.uuid4().hex}.partial"
        try:
            direct_io.create_file(tmp, parts, direct)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.replace(tmp, file)


def _preadv_all(fd: int, buffers: list[memoryview], size: int, file: str) -> None:
    done = 0
    while done < size:
        got = os.preadv(fd, _advance(buffers, done), done)
        if got == 0:
            raise StoreError(f"chunk file {file} ended early while being read")
        done += got


def _pread_all(fd: int, size: int, file: str) -> bytes:
    buf = bytearray(size)
    _preadv_all(fd, [memoryview(buf)], size, file)
    return bytes(buf)


def _strip_checksum(raw: bytes, file: str) -> bytes:
    import google_crc32c

    if len(raw) < 4 or np.uint32(google_crc32c.value(raw[:-4])).tobytes() != raw[-4:]:
        raise StoreError(f"chunk file {file}: checksum mismatch (corrupt chunk)")
    return raw[:-4]


def _advance(buffers: list[memoryview], done: int) -> list[memoryview]:
    """The part of ``buffers`` after the first ``done`` bytes (to resume a short read)."""
    out = []
    for b in buffers:
        if done >= len(b):
            done -= len(b)
            continue
        out.append(b[done:])
        done = 0
    return out
