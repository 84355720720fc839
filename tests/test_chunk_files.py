"""Direct chunk I/O (``mmer_dist.store.chunk_files``) against zarr itself, for every codec
pipeline it serves: what it writes zarr reads back, what zarr writes it reads, edge chunks and
stacked (N, rows, cols) arrays included; checksums catch corruption; anything else is declined."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from mmer_dist.errors import StoreError
from mmer_dist.store.chunk_files import ChunkFiles

PIPELINES = {
    "bytes": ([], []),
    "bytes+crc32c": ([], [Crc32cCodec()]),
    "zstd": ([ZstdCodec(level=1)], []),
    "zstd+crc32c": ([ZstdCodec(level=1)], [Crc32cCodec()]),
}


def _array(root, name, shape, chunks, pipeline, dtype="uint16"):
    compressors, checksums = PIPELINES[pipeline]
    return zarr.create_array(zarr.storage.LocalStore(str(root)), name=name, shape=shape, chunks=chunks, dtype=dtype,
                             fill_value=0, compressors=compressors + checksums or None,
                             serializer=BytesCodec(), config={"write_empty_chunks": True})


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("lead", [None, 3])
def test_written_chunks_read_back_through_zarr(tmp_path, pipeline, lead):
    rows, cols, rpc = 10, 6, 4  # chunks of 4, 4 and an edge chunk of 2 rows
    shape, chunks = ((lead,) if lead else ()) + (rows, cols), ((lead,) if lead else ()) + (rpc, cols)
    arr = _array(tmp_path, "a", shape, chunks, pipeline)
    files = ChunkFiles.read_metadata(str(tmp_path / "a"))
    assert files is not None and files.leading_axes == (1 if lead else 0)
    data = np.random.default_rng(0).integers(0, 60000, size=shape, dtype=np.uint16)
    for start in range(0, rows, rpc):
        files.write(start, data[..., start:start + rpc, :])
    assert np.array_equal(zarr.open_array(zarr.storage.LocalStore(str(tmp_path)), path="a")[...], data)
    assert arr.nchunks_initialized == arr.nchunks


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_chunks_zarr_wrote_read_directly(tmp_path, pipeline):
    arr = _array(tmp_path, "a", (10, 6), (4, 6), pipeline, dtype="float32")
    data = np.random.default_rng(1).standard_normal((10, 6)).astype(np.float32)
    arr[...] = data
    files = ChunkFiles.read_metadata(str(tmp_path / "a"))
    for start, stop in ((0, 4), (4, 8), (8, 10)):
        assert files.is_one_chunk(start, stop)
        out = np.empty((stop - start, 6), dtype=np.float32)
        files.read_into(start, out)
        assert np.array_equal(out, data[start:stop])
    assert not files.is_one_chunk(0, 3) and not files.is_one_chunk(2, 6)


def test_a_missing_chunk_file_is_damage_not_zeros(tmp_path):
    # the store writes every chunk when it fills an array (zeros too): one that is not there
    # was lost, and reading it must say so rather than hand back zeros
    _array(tmp_path, "a", (8, 4), (4, 4), "bytes")
    out = np.full((4, 4), 7, dtype=np.uint16)
    with pytest.raises(StoreError, match=r"c/1/0.*missing"):
        ChunkFiles.read_metadata(str(tmp_path / "a")).read_into(4, out)


@pytest.mark.parametrize("pipeline", ["bytes+crc32c", "zstd+crc32c"])
def test_checksums_catch_a_flipped_byte(tmp_path, pipeline):
    arr = _array(tmp_path, "a", (8, 4), (4, 4), pipeline)
    arr[...] = np.arange(32, dtype=np.uint16).reshape(8, 4)
    chunk = tmp_path / "a" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"c/1/0.*(checksum|corrupt)"):
        ChunkFiles.read_metadata(str(tmp_path / "a")).read_into(4, np.empty((4, 4), dtype=np.uint16))


def test_a_truncated_chunk_is_an_error_naming_the_file(tmp_path):
    arr = _array(tmp_path, "a", (8, 4), (4, 4), "bytes")
    arr[...] = 1
    chunk = tmp_path / "a" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-2])
    with pytest.raises(StoreError, match="c/0/0.*truncated"):
        ChunkFiles.read_metadata(str(tmp_path / "a")).read_into(0, np.empty((4, 4), dtype=np.uint16))


def test_other_layouts_are_left_to_zarr(tmp_path):
    root = zarr.storage.LocalStore(str(tmp_path))
    zarr.create_array(root, name="blosc", shape=(8, 4), chunks=(4, 4), dtype="uint16", compressors=[BloscCodec()])
    zarr.create_array(root, name="split_cols", shape=(8, 4), chunks=(4, 2), dtype="uint16")
    zarr.create_array(root, name="fill", shape=(8, 4), chunks=(4, 4), dtype="uint16", fill_value=3)
    for name in ("blosc", "split_cols", "fill", "absent"):
        assert ChunkFiles.read_metadata(str(tmp_path / name)) is None, name
