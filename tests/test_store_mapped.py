"""Chunk files mapped side by side instead of copied (``mmer_dist.store.mapped``), the once-per-merge
checksum check, and version writes past the page cache (``mmer_dist.store.direct_io``).

Unit level: mapped reads equal copied reads and zarr's own data, edge chunks included; the same
size and checksum checks catch truncated and corrupt files (a flipped byte in the data or in an
edge chunk's padding); chunks that cannot be mapped are declined. End to end: a store whose chunks
are whole pages merges through the mapped path (seen by a spy on the real function) and equals
the independent reference, and ``mmer verify`` accepts the version written past the page cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from store_helpers import reference_for_version, run_cli, status_json
from transformers import LlamaConfig, LlamaForCausalLM

from mmer_dist.errors import StoreError
from mmer_dist.store import direct_io, layout, mapped
from mmer_dist.method.masks import unpack_bits
from mmer_dist.store.chunk_files import ChunkFiles
from mmer_dist.store.store import Store

pytestmark = pytest.mark.skipif(not mapped.AVAILABLE, reason="mapped reads are Linux-only (others copy)")

COLS = 1024  # uint16: one row is 2 KiB, so every even number of rows is whole pages


def _array(root, name, rows=10, rows_per_chunk=4, compress=False, lead=None, seed=0):
    shape, chunks = (rows, COLS), (rows_per_chunk, COLS)
    if lead:
        shape, chunks = (lead,) + shape, (lead,) + chunks
    arr = zarr.create_array(zarr.storage.LocalStore(str(root)), name=name, shape=shape, chunks=chunks, dtype="uint16",
                            fill_value=0, compressors=([zarr.codecs.ZstdCodec(level=1)] if compress else [])
                            + [zarr.codecs.Crc32cCodec()], config={"write_empty_chunks": True})
    data = np.random.default_rng(seed).integers(0, 60000, size=shape, dtype=np.uint16)
    arr[...] = data
    return ChunkFiles.read_metadata(str(root / name)), data


def _map(files, start, rows, stack=None, offset=0):
    nbytes = rows * COLS * 2
    stack = stack or mapped.MappedStack(nbytes + offset)
    files.map_into(start, stack, offset, nbytes)
    return stack, np.frombuffer(stack.view(offset + nbytes)[offset:], dtype=np.uint16).reshape(rows, COLS)


def test_mapped_chunks_equal_the_data_and_copied_reads(tmp_path):
    # chunks of 4, 4 and an edge chunk of 2 rows (its file is padded to 4 rows + the checksum)
    arrays = [_array(tmp_path, f"a{i}", seed=i) for i in range(3)]
    for start, stop in ((0, 4), (4, 8), (8, 10)):
        rows = stop - start
        slot = rows * COLS * 2
        assert all(f.can_map(slot) for f, _ in arrays)
        stack = mapped.MappedStack(3 * slot)
        for i, (f, _) in enumerate(arrays):
            f.map_into(start, stack, i * slot, slot)
        got = stack.tensor(3 * slot).view(torch.int16).view(3, rows, COLS)
        for i, (f, data) in enumerate(arrays):
            copied = np.empty((rows, COLS), dtype=np.uint16)
            f.read_into(start, copied)
            assert np.array_equal(got[i].numpy().view(np.uint16), data[start:stop])
            assert np.array_equal(copied, data[start:stop])


def test_a_mapped_range_is_reused_in_place(tmp_path):
    (fa, da), (fb, db) = _array(tmp_path, "a", seed=1), _array(tmp_path, "b", seed=2)
    stack, first = _map(fa, 0, 4)
    held = stack.tensor(4 * COLS * 2)  # a tensor over the range keeps it reserved
    _map(fb, 4, 4, stack)
    assert np.array_equal(held.numpy().view(np.uint16).reshape(4, COLS), db[4:8])  # the range now shows b
    del first


@pytest.mark.parametrize("where", ["data", "edge padding"])
def test_checksums_catch_a_flipped_byte_in_a_mapped_chunk(tmp_path, where):
    files, _ = _array(tmp_path, "a")
    chunk = tmp_path / "a" / "c" / "2" / "0"  # the edge chunk: 2 rows of data, 2 of padding
    raw = bytearray(chunk.read_bytes())
    raw[10 if where == "data" else 2 * COLS * 2 + 10] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"c/2/0.*checksum"):
        _map(files, 8, 2)


def test_a_truncated_chunk_is_refused_before_it_is_mapped(tmp_path):
    files, _ = _array(tmp_path, "a")
    chunk = tmp_path / "a" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-4096])  # mapped, its missing pages would kill the reader
    with pytest.raises(StoreError, match="c/0/0.*truncated"):
        _map(files, 0, 4)


def test_chunks_that_cannot_be_mapped_are_declined(tmp_path):
    plain, _ = _array(tmp_path, "plain")
    assert not plain.can_map(3 * COLS)  # 1.5 pages: the next slot would not start on a page
    assert not _array(tmp_path, "zstd", compress=True)[0].can_map(4 * COLS * 2)
    assert not _array(tmp_path, "stacked", lead=2)[0].can_map(4 * COLS * 2)
    with pytest.raises(ValueError, match="cannot map"):
        plain.map_into(0, mapped.MappedStack(4096), 0, 8192)  # past the range's end


@pytest.fixture
def tmpfs_dir():
    """A directory on a tmpfs (/dev/shm), where direct I/O may be refused: writes fall back."""
    if not os.path.isdir("/dev/shm"):
        pytest.fail("/dev/shm (a tmpfs) is missing on this Linux machine")
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="mmer-test-"))
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("size", [0, 5, 4096, 4100, (3 << 20) + 4])
@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_files_written_past_the_page_cache_hold_exactly_their_bytes(tmp_path, tmpfs_dir, size, where):
    root = tmp_path if where == "disk" else tmpfs_dir
    payload = np.random.default_rng(size).integers(0, 256, size=max(0, size - 4), dtype=np.uint8)
    parts = [payload, b"\x01\x02\x03\x04"[:size - payload.size]]
    for direct in (True, False):
        path = str(root / f"f-{size}-{direct}")
        direct_io.create_file(path, parts, direct=direct)
        with open(path, "rb") as f:
            assert f.read() == payload.tobytes() + bytes(parts[1])
        with pytest.raises(FileExistsError):  # never replaces a file: the caller publishes by rename
            direct_io.create_file(path, parts, direct=direct)


# -- a real store whose chunks are whole pages ---------------------------------------------------


def _llama(path, seed, base=None):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if base is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] + (torch.randn(p.shape) * 2e-3).to(torch.bfloat16))
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A store of a 256-wide Llama: bf16 rows of 512 bytes, so the embedding's 256-row chunks
    and the layer's weights are whole pages (mapped), a norm's single row is not (copied)."""
    root = tmp_path_factory.mktemp("aligned")
    base = _llama(root / "base", 0)
    models = {f"m{i}": _llama(root / f"m{i}", 10 + i, base) for i in range(3)}
    store = root / "store"
    run_cli("ingest", "--store", store, "--base", root / "base", "--chunk-elems", "65536", "--quiet")
    for m in models:
        run_cli("ingest", "--store", store, "--model", m, "--path", root / m, "--modality", "text",
                "--format", "llama", "--quiet")
    return store, base, models


def _paths(tensor):
    return [f"{layout.BASE_LLM}/{tensor}"] + [f"{layout.model_llm(m)}/{tensor}" for m in ("m0", "m1", "m2")]


def test_read_stacked_maps_whole_page_chunks_and_checks_each_file_once(aligned, tmp_path):
    store_path = tmp_path / "store"
    shutil.copytree(aligned[0], store_path)  # this test corrupts a chunk
    store = Store.open(str(store_path))
    tensor, rows = "model.embed_tokens.weight", 256
    paths = _paths(tensor)
    stack, verified = mapped.MappedStack(len(paths) * rows * 256 * 2), set()
    got = store.read_stacked(paths, 256, 512, stack=stack, verified=verified).clone()
    assert verified == {(p, 256) for p in paths}
    assert torch.equal(got, store.read_stacked(paths, 256, 512))  # the copying path
    assert torch.equal(got[0], aligned[1][tensor][256:512])  # the base's rows, as saved
    chunk = store_path / paths[2] / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0x01
    chunk.write_bytes(bytes(raw))
    store.read_stacked(paths, 256, 512, stack=stack, verified=verified)  # checked before: trusted
    with pytest.raises(StoreError, match=r"c/1/0.*checksum"):
        store.read_stacked(paths, 256, 512, stack=stack, verified=set())
    norm = _paths("model.norm.weight")  # 512 bytes a chunk: not whole pages, copied instead
    assert torch.equal(store.read_stacked(norm, 0, 1, stack=stack), store.read_stacked(norm, 0, 1))


def test_a_page_aligned_store_merges_through_mapped_reads_and_equals_the_reference(aligned, tmp_path, monkeypatch):
    store_path = tmp_path / "store"
    shutil.copytree(aligned[0], store_path)
    _, base, models = aligned
    calls = []
    real = ChunkFiles.map_into

    def spy(self, start, stack, offset, nbytes, verify=True):  # the real function, counted
        calls.append((self.directory, start, verify))
        return real(self, start, stack, offset, nbytes, verify)

    monkeypatch.setattr(ChunkFiles, "map_into", spy)
    run_cli("merge", "--store", store_path, "--quiet", "--no-compile", "--device", "cpu", "--topk", "0.7")
    mapped_tensors = {os.path.basename(d) for d, _, _ in calls}
    assert {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"} <= mapped_tensors
    assert "model.norm.weight" not in mapped_tensors
    version = status_json(store_path)["versions"][-1]
    assert version["passes"] == ["LowPass", "FinalPass"]  # every chunk read twice...
    files = {(d, s) for d, s, _ in calls}
    assert len(calls) == 2 * len(files) and sum(v for *_, v in calls) == len(files)  # ...checksummed once
    ref = reference_for_version(version, base, models)
    s = Store.open(str(store_path))
    v = version["version"]
    for t in s.catalog().tensors:
        got = s.read(f"{layout.version_tau_star(v)}/{t.name}").reshape(ref.tau_star[t.name].shape)
        assert torch.equal(got.view(torch.int32), ref.tau_star[t.name].view(torch.int32)), t.name
        packed = s.read(f"{layout.version_masks(v)}/{t.name}")
        for i in range(len(models)):
            want = ref.masks[i][t.name].reshape(packed.shape[1], -1)
            assert torch.equal(unpack_bits(packed[i], want.shape[1]), want), (t.name, i)
    assert "OK" in run_cli("verify", "--store", store_path).out  # the version written past the page cache
