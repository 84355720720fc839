"""The store's building blocks on a real zarr store: bf16 stored as its bits (losslessly, special
values included), the row-block chunk grid, catalog snapshots behind an atomic CURRENT pointer."""

from __future__ import annotations

import pytest
import torch

from mmer_dist.errors import StoreError
from mmer_dist.store import layout
from mmer_dist.store.catalog import ModelRecord
from mmer_dist.store.store import ArraySpec, Store


def _special(dtype: torch.dtype) -> torch.Tensor:
    finfo = torch.finfo(dtype)
    values = torch.tensor([0.0, -0.0, 1.0, -1.5, float("inf"), float("-inf"), finfo.max, finfo.tiny,
                           finfo.tiny / 4, finfo.eps, -finfo.max, 3.14159], dtype=torch.float32).to(dtype)
    t = torch.cat([values, (torch.randn(52, generator=torch.Generator().manual_seed(0)) * 7).to(dtype)])
    t = t.reshape(4, 16).clone()
    bits = t.view({2: torch.int16, 4: torch.int32}[t.element_size()])
    bits[3, 15] = 0x7FC1 if t.element_size() == 2 else 0x7FC00123  # a NaN with a payload
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensors_round_trip_bit_for_bit(tmp_path, dtype):
    store = Store.create(str(tmp_path / "s"))
    name = layout.dtype_name(dtype)
    t = _special(dtype)
    store.create_array("x/y", 4, 16, 3, name)  # 3-row chunks: the last chunk is partial
    store.write_rows("x/y", 0, t[:2])
    store.write_rows("x/y", 2, t[2:])
    reopened = Store.open(str(tmp_path / "s"))  # a fresh handle: what is on disk
    got = reopened.read_rows("x/y", 0, 4)
    view = {2: torch.int16, 4: torch.int32}[t.element_size()]
    assert got.dtype == dtype and torch.equal(got.view(view), t.view(view))
    assert reopened.array_dtype("x/y") == name
    if dtype == torch.bfloat16:
        assert str(store.array("x/y").dtype) == "uint16"
    assert store.read_rows("x/y", 1, 3).view(view).tolist() == t[1:3].view(view).tolist()


def test_arrays_created_together_replace_only_their_own_paths(tmp_path):
    # on a local store zarr builds the metadata in memory and the documents are written directly:
    # an array's replaces whatever was at its path, existing groups (the root's attributes) stay
    root = tmp_path / "s"
    store = Store.create(str(root))
    marker = store.group.attrs.asdict()
    store.create_array("v/a", 4, 16, 2, "float32")
    store.write_rows("v/a", 0, torch.ones(4, 16))
    store.create_arrays([ArraySpec("v/a", 6, 8, 3, "float32"), ArraySpec("v/m", 6, 1, 3, "uint8", True, 2)])
    reopened = Store.open(str(root))
    assert reopened.group.attrs.asdict() == marker
    assert reopened.array("v/a").shape == (6, 8) and reopened.array("v/m").shape == (2, 6, 1)
    assert not list((root / "v" / "a").glob("c/*"))  # the old array's chunks went with it
    with pytest.raises(StoreError, match="'v/a'.*not a zarr group"):  # no array inside an array
        store.create_arrays([ArraySpec("v/a/inner", 2, 2, 1, "float32")])


def test_chunk_grid():
    assert layout.matrix_shape(()) == (1, 1)
    assert layout.matrix_shape((7,)) == (1, 7)
    assert layout.matrix_shape((5, 3)) == (5, 3)
    assert layout.matrix_shape((4, 3, 2)) == (4, 6)
    assert layout.rows_per_chunk((100, 10), 250) == 25
    assert layout.rows_per_chunk((100, 10), 5) == 1  # at least one whole row
    assert layout.rows_per_chunk((3, 10), 10**6) == 3
    assert layout.packed_cols(17) == 3 and layout.packed_cols(16) == 2
    with pytest.raises(ValueError, match="int64"):
        layout.dtype_name(torch.int64)


@pytest.mark.parametrize("shape, itemsize", [((32000, 768), 2), ((32001, 768), 2), ((50257, 768), 4),
                                             ((32000, 4096), 2), ((151936, 896), 2)])
def test_chunk_rows_make_whole_memory_pages_where_that_costs_little(shape, itemsize):
    # a merge maps chunks of whole pages instead of copying them; the grid moves by under 2%
    rows, cols = shape
    balanced = -(-rows // -(-rows * cols // layout.DEFAULT_CHUNK_ELEMS))
    got = layout.rows_per_chunk(shape, itemsize=itemsize)
    assert balanced <= got <= balanced * 1.02
    assert got * cols * itemsize % layout.PAGE_BYTES == 0
    assert -(-rows // got) == -(-rows // balanced)  # the same number of chunks


def test_catalog_snapshots_and_pointer(tmp_path):
    root = tmp_path / "s"
    store = Store.create(str(root))
    assert store.catalog().seq == 0 and store.catalog().models == ()
    record = ModelRecord("m1", "image", "llava", "/src", "bfloat16", 10, 0, 3, "ab" * 32, 1.0, "t", 0.1)
    c1 = store.commit(store.catalog().replace(models=(record,)), 0)
    c2 = store.commit(c1.replace(models=c1.models + (record.__class__(**{**record.__dict__, "id": "m2"}),)), c1.seq)
    assert (c1.seq, c2.seq) == (1, 2)
    assert (root / "catalog" / "CURRENT").read_text().strip() == "2"
    assert sorted(p.name for p in (root / "catalog" / "commits").iterdir()) == ["00000001.json", "00000002.json"]
    assert sorted(p.name[:8] for p in (root / "catalog" / "snapshots").iterdir()) == ["00000001", "00000002"]
    # a fresh handle reads the snapshot CURRENT names, records intact
    again = Store.open(str(root)).catalog()
    assert again.seq == 2 and again.models == c2.models
    assert [p.name for p in (root / "catalog").iterdir() if ".tmp-" in p.name] == []
    # an unknown model is named in the error
    with pytest.raises(StoreError, match="'nope'.*m1, m2"):
        again.model("nope")


def test_create_refuses_existing_content(tmp_path):
    Store.create(str(tmp_path / "s"))
    with pytest.raises(StoreError, match="already holds a store"):
        Store.create(str(tmp_path / "s"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        Store.create(str(tmp_path / "other"))
    (tmp_path / "empty").mkdir()
    Store.create(str(tmp_path / "empty"))  # an empty directory is fine
    assert Store.exists(str(tmp_path / "empty"))


def test_missing_array_is_a_store_error(tmp_path):
    store = Store.create(str(tmp_path / "s"))
    with pytest.raises(StoreError, match="'models/x/llm/w' is missing"):
        store.read_rows("models/x/llm/w", 0, 1)


def test_staging_resumes_only_from_complete_files(tmp_path):
    """A merge's staging area as a SIGKILL can leave it: files cut short mid-write count as never
    written (the shard is redone, the passes re-run, or the staging restarts), and a staging whose
    arrays were not all created is never resumed."""
    from mmer_dist.store.versions import Staging

    store = Store.create(str(tmp_path / "s"))
    staging_dir = tmp_path / "s" / layout.version_staging(1)

    fresh = Staging.open(store, 1, "fp-a")
    assert not fresh.resumed
    assert not Staging.open(store, 1, "fp-a").resumed  # arrays never marked ready: start afresh
    fresh = Staging.open(store, 1, "fp-a")
    fresh.mark_arrays_ready()
    for shard in (0, 1):
        fresh.mark_shard_done(shard, {"mask_counts": [shard], "nonzero": 1, "entries": 2, "seconds": 0.1})
    fresh.save_state({"threshold_bits": {"*": [1]}, "majority": {"*": 1.0}})

    again = Staging.open(store, 1, "fp-a")
    assert again.resumed and sorted(again.done_shards()) == [0, 1] and again.load_state()["majority"] == {"*": 1.0}

    for name in ("shards/00001.json", "state.json"):  # cut short
        f = staging_dir / name
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    again = Staging.open(store, 1, "fp-a")
    assert again.resumed and sorted(again.done_shards()) == [0] and again.load_state() is None

    (staging_dir / "plan.json").write_bytes(b"")  # killed while writing the plan
    restarted = Staging.open(store, 1, "fp-a")
    assert not restarted.resumed and restarted.done_shards() == {}
    assert not Staging.open(store, 1, "fp-b").resumed  # another run's fingerprint: start afresh
