"""Damaged stores are found, never read as zeros (issue 18, item 5).

A deleted chunk, a flipped byte in a chunk, a truncated catalog Parquet file and a changed
component file: ``export`` (``--original`` included, "bit for bit") and ``merge`` refuse with an
error naming the array and chunk, and ``mmer verify`` lists each one and exits non-zero. A
clean store verifies.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import copy_store
from store_helpers import StoreState, run_cli


def _chunk_files(store: Path, array: str) -> list[Path]:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())


ARRAY = "models/llava-hf/llm/model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def store(merged_store, tmp_path):
    return copy_store(merged_store, tmp_path / "store")


def test_a_clean_store_verifies(store):
    r = run_cli("verify", "--store", store, "--quiet")
    assert "OK" in r.out and "damaged" not in r.out
    assert "0 arrays" not in r.out and " 0 files" not in r.out


def test_a_deleted_chunk_is_named_by_export_merge_and_verify(store, tmp_path):
    chunk = _chunk_files(store, ARRAY)[0]
    key = chunk.relative_to(store / ARRAY).as_posix()
    chunk.unlink()
    before = StoreState.capture(store)
    r = run_cli("export", "original", "--store", store, "--model", "llava-hf", "--out", tmp_path / "o", "--quiet",
                ok=False)
    assert r.rc == 2 and ARRAY in r.err and key in r.err and "missing" in r.err, r.err
    assert not (tmp_path / "o").exists()
    r = run_cli("merge", "--store", store, "--quiet", "--no-compile", "--device", "cpu", ok=False)
    assert ARRAY in r.err and "missing" in r.err and "Traceback" not in r.err
    assert StoreState.capture(store) == before  # the failed merge left nothing behind
    r = run_cli("verify", "--store", store, "--quiet", ok=False)
    assert r.rc == 2 and f"array {ARRAY!r} chunk {key!r} is missing" in r.out


def test_a_flipped_byte_is_named_by_export_and_verify(store, tmp_path):
    tau = "versions/000001/tau_star/model.layers.1.mlp.up_proj.weight"
    chunk = _chunk_files(store, tau)[-1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    key = chunk.relative_to(store / tau).as_posix()
    r = run_cli("export", "merged", "--store", store, "--version", "1", "--out", tmp_path / "o", "--quiet", ok=False)
    assert tau in r.err and key in r.err and "checksum" in r.err, r.err
    r = run_cli("verify", "--store", store, "--quiet", ok=False)
    assert f"array {tau!r} chunk {key!r} is damaged" in r.out
    assert len([line for line in r.out.splitlines() if line.startswith("damaged:")]) == 1


def test_a_truncated_catalog_is_named(store):
    snapshot = sorted((store / "catalog" / "snapshots").iterdir())[-1]
    models = snapshot / "models.parquet"
    models.write_bytes(models.read_bytes()[:100])
    r = run_cli("status", "--store", store, ok=False)
    assert r.rc == 2 and "models.parquet is damaged" in r.err and "Traceback" not in r.err
    r = run_cli("verify", "--store", store, "--quiet", ok=False)
    assert "models.parquet is damaged" in r.out


def test_a_changed_component_file_is_named(store, tmp_path):
    f = store / "models" / "llava-hf" / "component" / "files" / "tokenizer_config.json"
    f.write_text(f.read_text().replace("{", "{ ", 1))
    r = run_cli("export", "model", "--store", store, "--model", "llava-hf", "--out", tmp_path / "o", "--quiet", ok=False)
    assert "tokenizer_config.json is damaged" in r.err
    r = run_cli("verify", "--store", store, "--quiet", ok=False)
    assert "models/llava-hf/component/files/tokenizer_config.json is damaged" in r.out


def test_a_store_of_the_previous_layout_gets_a_clear_message(store):
    import json

    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["mmer_store"] = 1
    (store / "zarr.json").write_text(json.dumps(meta))
    r = run_cli("status", "--store", store, ok=False)
    assert "layout 1" in r.err and "ingest it into a new store" in r.err


def test_all_zero_chunks_are_stored_whichever_handle_writes_them(tmp_path):
    """A chunk of zeros (common: tau* where no model moved, empty masks) is written like any other,
    so reading it through a fresh handle is not mistaken for a deleted chunk."""
    import torch

    from mmer_dist.store.store import Store

    url = str(tmp_path / "s")
    Store.create(url).create_array("v/masks", 4, 3, 2, "uint8", compress=True, lead=2)
    writer = Store.open(url)  # a worker reopens the array to write its chunks
    writer.write("v/masks", torch.zeros(2, 4, 3, dtype=torch.uint8), slice(None), slice(0, 4))
    got = Store.open(url).read("v/masks", slice(None), slice(0, 4))
    assert got.shape == (2, 4, 3) and int(got.sum()) == 0
