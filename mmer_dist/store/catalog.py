"""The catalog: Parquet tables describing the store, published as immutable snapshots.

Tables: ``store`` (one row: base model and layout), ``models`` (one row per ingested model),
``tensors`` (the base LLM's tensors and their chunk grid) and ``versions`` (published merges).
A commit writes a new snapshot directory and then swaps ``catalog/CURRENT``, the only mutable
object in the store; a reader resolves CURRENT once and sees one consistent snapshot. A writer
that dies before the swap leaves the previous snapshot current, so ingest and merge results
become visible all at once or not at all.
"""

from __future__ import annotations

import dataclasses
import io
import json
import typing
import uuid
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mmer_dist.errors import StoreError
from mmer_dist.store.layout import CATALOG


@dataclass(frozen=True)
class StoreRecord:
    layout: int
    created_at: str
    base_source: str
    base_sha256: str
    base_dtype: str
    base_config: str  # JSON of the base LLM config
    chunk_elems: int


@dataclass(frozen=True)
class ModelRecord:
    id: str
    modality: str
    format: str
    source: str
    dtype: str
    params: int  # LLM parameters shared with the base (what the merge sees)
    extra_rows: int  # vocabulary rows beyond the base's
    component_params: int
    sha256: str
    lam: float
    ingested_at: str
    ingest_seconds: float


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: list[int]
    dtype: str
    rows: int
    cols: int
    rows_per_chunk: int
    layer: int  # -1 before the decoder layers (embeddings), n_layers after (final norm, head)
    vocab_rows: bool  # its rows index the vocabulary: fine-tunes may carry extra rows

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.rows_per_chunk)


@dataclass(frozen=True)
class VersionRecord:
    version: int
    created_at: str
    # the merge settings (``MergeSettings.record()``; null where a field does not apply to the method)
    method: str
    mask_rule: str
    topk: float | None
    scope: str | None
    alpha: float
    dare_rate: float
    dare_seed: int | None
    neuro_energy: float | None
    neuro_keep_parallel: bool | None
    models: list[str]
    lams: list[float]
    mask_density: list[float]
    tau_star_density: float
    backend: str
    passes: list[str]
    seconds: float
    details: str  # JSON: thresholds, majority signs, per-pass and per-shard timings


_SCHEMAS = {
    "store": StoreRecord,
    "models": ModelRecord,
    "tensors": TensorRecord,
    "versions": VersionRecord,
}

_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_(),
          list[int]: pa.list_(pa.int64()), list[float]: pa.list_(pa.float64()), list[str]: pa.list_(pa.string())}


def _arrow_type(hint) -> pa.DataType:
    """Arrow type of a field's annotation; ``X | None`` is X (Arrow columns are nullable)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1:
        hint = args[0]
    return _ARROW[hint]


def _schema(record_type) -> pa.Schema:
    hints = typing.get_type_hints(record_type)
    return pa.schema([(f.name, _arrow_type(hints[f.name])) for f in dataclasses.fields(record_type)])


def _to_table(records: list, record_type) -> pa.Table:
    return pa.Table.from_pylist([dataclasses.asdict(r) for r in records], schema=_schema(record_type))


def _from_table(table: pa.Table, record_type) -> list:
    # a column added later as ``X | None`` reads as null from snapshots written before it
    hints = typing.get_type_hints(record_type)
    absent = {f.name: None for f in dataclasses.fields(record_type)
              if f.name not in table.column_names and type(None) in typing.get_args(hints[f.name])}
    return [record_type(**absent, **row) for row in table.to_pylist()]


@dataclass(frozen=True)
class Catalog:
    """One immutable snapshot of the catalog."""

    seq: int = 0
    store: StoreRecord | None = None
    models: tuple[ModelRecord, ...] = ()
    tensors: tuple[TensorRecord, ...] = ()
    versions: tuple[VersionRecord, ...] = ()

    def model(self, model_id: str) -> ModelRecord:
        for m in self.models:
            if m.id == model_id:
                return m
        known = ", ".join(m.id for m in self.models) or "none"
        raise StoreError(f"no model {model_id!r} in the store (models: {known})")

    def has_model(self, model_id: str) -> bool:
        return any(m.id == model_id for m in self.models)

    def latest_version(self) -> VersionRecord | None:
        return max(self.versions, key=lambda v: v.version) if self.versions else None

    def serving_version(self) -> int:
        """The version a server should serve: the latest published one."""
        latest = self.latest_version()
        if latest is None:
            raise StoreError("the store has no published merge version yet; run `mmer merge` first")
        return latest.version

    def version(self, number: int | None) -> VersionRecord:
        if number is None:
            latest = self.latest_version()
            if latest is None:
                raise StoreError("the store has no published merge version yet; run `mmer merge` first")
            return latest
        for v in self.versions:
            if v.version == number:
                return v
        raise StoreError(f"no version {number} in the store (versions: {[v.version for v in self.versions]})")

    def tensor_map(self) -> dict[str, TensorRecord]:
        return {t.name: t for t in self.tensors}

    def replace(self, **changes) -> Catalog:
        return dataclasses.replace(self, **changes)


def _snapshot_dir(root: str, seq: int) -> str:
    return f"{root}/{CATALOG}/snapshots/{seq:08d}"


def read_catalog(fs: fsspec.AbstractFileSystem, root: str) -> Catalog:
    pointer = f"{root}/{CATALOG}/CURRENT"
    if not fs.exists(pointer):
        return Catalog()
    seq = int(fs.cat_file(pointer).decode().strip())
    snap = _snapshot_dir(root, seq)
    tables = {}
    for name, record_type in _SCHEMAS.items():
        with fs.open(f"{snap}/{name}.parquet", "rb") as f:
            tables[name] = _from_table(pq.read_table(f), record_type)
    store = tables["store"][0] if tables["store"] else None
    return Catalog(seq, store, tuple(tables["models"]), tuple(tables["tensors"]), tuple(tables["versions"]))


def write_catalog(fs: fsspec.AbstractFileSystem, root: str, catalog: Catalog, expected_seq: int) -> Catalog:
    """Publish ``catalog`` as snapshot expected_seq + 1, then swap the CURRENT pointer."""
    current = read_catalog(fs, root).seq
    if current != expected_seq:
        raise StoreError(
            f"the catalog changed while this operation ran (snapshot {current}, expected {expected_seq}); "
            "another writer is active — re-run once it has finished"
        )
    seq = expected_seq + 1
    snap = _snapshot_dir(root, seq)
    fs.makedirs(snap, exist_ok=True)
    rows = {"store": [catalog.store] if catalog.store else [], "models": list(catalog.models),
            "tensors": list(catalog.tensors), "versions": list(catalog.versions)}
    for name, record_type in _SCHEMAS.items():
        buf = io.BytesIO()
        pq.write_table(_to_table(rows[name], record_type), buf)
        fs.pipe_file(f"{snap}/{name}.parquet", buf.getvalue())
    _atomic_put(fs, f"{root}/{CATALOG}/CURRENT", f"{seq}\n".encode())
    return dataclasses.replace(catalog, seq=seq)


def _atomic_put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace one small object atomically: rename on a local disk, a single PUT on object stores."""
    if "file" in fs.protocol or "local" in fs.protocol:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def details_json(**parts) -> str:
    return json.dumps(parts, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))

