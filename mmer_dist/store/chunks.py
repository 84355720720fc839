"""Chunk integrity on read: a missing chunk raises, a damaged one is named.

zarr reads a chunk that is not in the store as the array's fill value, so a deleted chunk of a
model would come back as zeros. ``StrictChunkStore`` wraps the zarr store used for reading and
raises ``MissingChunkError`` instead (every chunk is written at creation, zeros included, so a
missing one is always damage). A chunk whose bytes fail the crc32c codec, or do not decode,
makes zarr raise; ``chunk_errors`` turns both into a StoreError naming the array and chunk.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator

import zarr
from zarr.storage import WrapperStore

from mmer_dist.errors import StoreError

METADATA = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})  # v3 and v2 names zarr probes


class ChunkError(Exception):
    """A chunk that is missing or does not decode (internal; surfaces as StoreError)."""


class MissingChunkError(ChunkError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _is_chunk_key(key: str) -> bool:
    return key.rsplit("/", 1)[-1] not in METADATA


class StrictChunkStore(WrapperStore):
    """A zarr store whose reads of a chunk that does not exist raise instead of returning None."""

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is None and _is_chunk_key(key):
            raise MissingChunkError(key)
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values):
            if value is None and _is_chunk_key(key):
                raise MissingChunkError(key)
        return values


def chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    return arr.metadata.encode_chunk_key(coords)


def chunk_grid(arr: zarr.Array) -> tuple[int, ...]:
    """Chunks per dimension (of the outermost grid: shards when the array is sharded)."""
    return tuple(math.ceil(s / c) for s, c in zip(arr.shape, _outer_chunks(arr)))


def _outer_chunks(arr: zarr.Array) -> tuple[int, ...]:
    return tuple(arr.metadata.chunk_grid.chunk_shape)


def all_chunk_keys(arr: zarr.Array) -> Iterator[tuple[tuple[int, ...], str]]:
    for coords in itertools.product(*(range(n) for n in chunk_grid(arr))):
        yield coords, chunk_key(arr, coords)


def _coords_of(arr: zarr.Array, index: tuple) -> Iterable[tuple[int, ...]]:
    """Chunk coordinates a basic (int / unit-step slice) selection touches."""
    per_dim = []
    chunks = _outer_chunks(arr)
    for d, (size, c) in enumerate(zip(arr.shape, chunks)):
        sel = index[d] if d < len(index) else slice(None)
        if isinstance(sel, int):
            i = sel % size if size else 0
            per_dim.append(range(i // c, i // c + 1))
        elif isinstance(sel, slice):
            start, stop, _ = sel.indices(size)
            per_dim.append(range(start // c, math.ceil(stop / c)) if stop > start else range(0))
        else:
            per_dim.append(range(math.ceil(size / c)))
    return itertools.product(*per_dim)


def damaged_chunk(arr: zarr.Array, index: tuple) -> tuple[str, str] | None:
    """(chunk key, what is wrong) of the first chunk of ``index`` that does not read, or None."""
    for coords in _coords_of(arr, index):
        try:
            arr.get_block_selection(coords)
        except MissingChunkError:
            return chunk_key(arr, coords), "is missing (deleted, or never written)"
        except Exception as e:  # the crc32c codec's mismatch, a decoder's error, a short read
            return chunk_key(arr, coords), f"is damaged: {type(e).__name__}: {e}"
    return None


@contextlib.contextmanager
def chunk_errors(url: str, path: str, arr: zarr.Array, index: tuple) -> Iterator[None]:
    """Turn a failed read of ``arr[index]`` into a StoreError naming the array and the chunk."""
    try:
        yield
    except MissingChunkError as e:
        key = e.key.removeprefix(f"{path}/")
        raise StoreError(f"store {url!r}: array {path!r} chunk {key!r} "
                         "is missing (deleted, or never written); `mmer verify` lists every damaged chunk") from None
    except (OSError, StoreError):
        raise
    except Exception as e:
        found = damaged_chunk(arr, index)
        where = f"chunk {found[0]!r} {found[1]}" if found else f"does not read ({type(e).__name__}: {e})"
        raise StoreError(f"store {url!r}: array {path!r} {where}; `mmer verify` lists every damaged chunk") from None
