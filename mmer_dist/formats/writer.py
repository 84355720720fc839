"""Write a safetensors checkpoint (single file or HF-sharded) from row blocks, in any order.

Export reconstructs a model chunk by chunk from the store, so the whole state dict never exists
in memory. The writer therefore plans every file up front (shard assignment, header, each
tensor's byte offset), writes the headers first, and then places each row block with a
positioned write (``os.pwrite``) at its known offset: memory stays bounded by the block the
caller hands over, and blocks may arrive in any order (e.g. from parallel workers). ``close()``
proves that every byte of every tensor was written exactly once, then renames the files into
place and writes the index, so a crashed export never leaves a loadable-looking checkpoint.

File layout (the safetensors format): 8-byte little-endian header length N, N bytes of JSON
(``{"__metadata__": {...}, key: {"dtype", "shape", "data_offsets": [begin, end]}}``, padded
with spaces to a multiple of 8), then the tensor bytes, offsets relative to the data start.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from mmer_dist.errors import FormatError
from mmer_dist.formats.checkpoint import DTYPE_CODES, INDEX_NAME

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_PARTIAL = ".partial"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@dataclass
class _Planned:
    """One tensor's place in its file and the row ranges written so far."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # absolute byte offset in the file
    rows: int  # dim 0 length (1 for a scalar)
    row_bytes: int
    written: list[tuple[int, int]] = field(default_factory=list)

    def nbytes(self) -> int:
        return self.rows * self.row_bytes


def plan_shards(entries: Sequence[tuple[str, Sequence[int], torch.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Indices of ``entries`` per file: in the given order, a new file whenever the next tensor
    would push the current one past ``max_shard_bytes`` (a tensor larger than that gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(entries):
        nbytes = _numel(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


class SafetensorsWriter:
    """Streaming writer. ``entries`` is ``[(key, shape, dtype)]``; call :meth:`write` for row
    blocks, then :meth:`close`. As a context manager it closes on success and removes its
    partial files on error."""

    def __init__(
        self,
        out_dir: str | Path,
        entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        counts = Counter(key for key, _, _ in entries)
        dupes = sorted(k for k, c in counts.items() if c > 1)
        if dupes:
            raise FormatError(f"writer for {self.out_dir}: duplicate keys {dupes}")
        if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise FormatError(f"writer for {self.out_dir}: safetensors metadata must map str to str, got {metadata!r}")
        for key, _, dtype in entries:
            if dtype not in DTYPE_CODES:
                raise FormatError(f"writer for {self.out_dir}: tensor {key!r} has dtype {dtype}, not a safetensors dtype")
        self.metadata = {"format": "pt", **(metadata or {})}
        groups = plan_shards(entries, max_shard_bytes)
        names = ["model.safetensors"] if len(groups) == 1 else [
            f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
        ]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._tensors: dict[str, _Planned] = {}
        self._fds: dict[str, int] = {}
        self._closed = False
        for name, group in zip(names, groups):
            self._start_file(name, [entries[i] for i in group])

    @property
    def files(self) -> list[str]:
        """The planned file names, in order."""
        return list(self._fds)

    def _start_file(self, name: str, entries: list[tuple[str, Sequence[int], torch.dtype]]) -> None:
        # Widest dtypes first (as safetensors' own writer does), so every tensor is aligned to
        # its element size once the data section starts on an 8-byte boundary.
        ordered = sorted(entries, key=lambda e: -e[2].itemsize)
        header: dict[str, object] = {"__metadata__": self.metadata}
        position = 0
        spans = []
        for key, shape, dtype in ordered:
            nbytes = _numel(shape) * dtype.itemsize
            header[key] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [position, position + nbytes]}
            spans.append((key, tuple(int(d) for d in shape), dtype, position))
            position += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        data_start = 8 + len(raw)
        for key, shape, dtype, offset in spans:
            rows = shape[0] if shape else 1
            row_bytes = (_numel(shape) // rows if rows else 0) * dtype.itemsize
            self._tensors[key] = _Planned(name, shape, dtype, data_start + offset, rows, row_bytes)
        fd = os.open(self.out_dir / (name + _PARTIAL), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds[name] = fd
        _pwrite_all(fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(fd, data_start + position)

    def write(self, key: str, row_start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` as rows ``row_start : row_start + len(rows)`` of tensor ``key`` (a
        scalar is written whole with ``row_start=0``). Shape, dtype and overlap are checked."""
        if self._closed:
            raise FormatError(f"writer for {self.out_dir}: write({key!r}) after close")
        if key not in self._tensors:
            raise FormatError(f"writer for {self.out_dir}: tensor {key!r} is not in the plan")
        t = self._tensors[key]
        n = rows.shape[0] if t.shape and rows.dim() else 1
        expected = ((n,) + t.shape[1:]) if t.shape else ()
        if rows.dtype != t.dtype or tuple(rows.shape) != expected:
            raise FormatError(
                f"writer for {self.out_dir}: tensor {key!r} block at row {row_start} is {tuple(rows.shape)} {rows.dtype}, "
                f"expected {expected} {t.dtype}"
            )
        stop = row_start + n
        if row_start < 0 or stop > t.rows:
            raise FormatError(f"writer for {self.out_dir}: tensor {key!r} rows {row_start}:{stop} outside 0:{t.rows}")
        # ``written`` stays sorted and disjoint, so only the two neighbours can overlap.
        i = bisect.bisect_left(t.written, (row_start, stop))
        for begin, end in t.written[max(i - 1, 0): i + 1]:
            if begin < stop and row_start < end:
                raise FormatError(
                    f"writer for {self.out_dir}: tensor {key!r} rows {row_start}:{stop} overlap rows {begin}:{end} "
                    f"already written"
                )
        if n:
            data = rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            _pwrite_all(self._fds[t.file], data, t.offset + row_start * t.row_bytes)
            t.written.insert(i, (row_start, stop))

    def close(self) -> None:
        """Check completeness, then publish the files (rename) and, if sharded, the index."""
        if self._closed:
            return
        for key, t in self._tensors.items():
            covered = sum(end - begin for begin, end in t.written)
            if t.nbytes() and covered != t.rows:
                missing = _first_gap(t.written, t.rows)
                raise FormatError(
                    f"writer for {self.out_dir}: tensor {key!r} is incomplete: {covered} of {t.rows} rows written "
                    f"(rows {missing[0]}:{missing[1]} missing)"
                )
        for name, fd in self._fds.items():
            os.fsync(fd)
            os.close(fd)
            os.replace(self.out_dir / (name + _PARTIAL), self.out_dir / name)
        self._closed = True
        if len(self._fds) > 1:
            self._write_index()
        self._remove_stale_weights()

    def _remove_stale_weights(self) -> None:
        """Drop weight files of an earlier export into the same folder (as ``save_pretrained``
        does): a stale index or shard would otherwise be read instead of, or beside, ours."""
        stale = [p for p in self.out_dir.glob("model*.safetensors") if p.name not in self._fds]
        if len(self._fds) == 1:
            stale.append(self.out_dir / INDEX_NAME)
        for p in stale:
            if p.name == "model.safetensors" or _SHARD_NAME.fullmatch(p.name) or p.name == INDEX_NAME:
                p.unlink(missing_ok=True)

    def _write_index(self) -> None:
        # transformers' exact layout: sorted keys, indent 2, trailing newline.
        index = {
            "metadata": {
                "total_parameters": sum(_numel(t.shape) for t in self._tensors.values()),
                "total_size": sum(t.nbytes() for t in self._tensors.values()),
            },
            "weight_map": {key: t.file for key, t in self._tensors.items()},
        }
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def abort(self) -> None:
        """Close and delete the partial files (nothing is published)."""
        if self._closed:
            return
        for name, fd in self._fds.items():
            os.close(fd)
            (self.out_dir / (name + _PARTIAL)).unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _pwrite_all(fd: int, data: object, offset: int) -> None:
    """``os.pwrite`` may write less than asked (Linux caps one call near 2 GiB); loop until done."""
    view = memoryview(data).cast("B")  # type: ignore[arg-type]
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _first_gap(written: list[tuple[int, int]], rows: int) -> tuple[int, int]:
    """The first unwritten row range, given sorted disjoint written ranges."""
    position = 0
    for begin, end in written:
        if begin > position:
            return position, begin
        position = end
    return position, rows
