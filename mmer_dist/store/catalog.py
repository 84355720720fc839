"""The catalog: Parquet tables describing the store, published as immutable snapshots.

Tables: ``store`` (one row: base model and layout), ``models`` (one row per ingested model),
``tensors`` (the base LLM's tensors and their chunk grid) and ``versions`` (published merges).
A commit writes the snapshot's Parquet files under a directory of its own, then creates
``catalog/commits/<seq>.json`` exclusively (the commit point: on S3 and GCS a conditional create,
so two writers can never both commit snapshot ``seq`` and neither commit is lost), and finally
updates ``catalog/CURRENT``, a hint from which readers look ahead for later commits. A reader
resolves the latest commit once and sees one consistent snapshot, each file checked against the
sha256 its commit records. A writer that dies before its commit leaves the previous snapshot
latest, so ingest and merge results become visible all at once or not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import typing
import uuid
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mmer_dist.errors import StoreError
from mmer_dist.store.atomic import atomic_put, create_exclusive
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
    task: str | None = None  # what it was fine-tuned for, when it is one of several of its modality
    removed_at: str | None = None  # set by `mmer remove`: kept for the versions that hold it, then gc


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


@dataclass(frozen=True)
class ServingRecord:
    """One entry of the serving log: ``promote`` pushes a version, ``rollback`` pops the top.
    The version served is the top of the stack the log replays to."""

    seq: int
    action: str  # promote | rollback
    version: int  # the version served after this entry
    at: str


_SCHEMAS = {
    "store": StoreRecord,
    "models": ModelRecord,
    "tensors": TensorRecord,
    "versions": VersionRecord,
    "serving": ServingRecord,
}
_OPTIONAL_TABLES = frozenset({"serving"})  # absent from snapshots written before it: empty

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
    serving: tuple[ServingRecord, ...] = ()

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

    def serving_stack(self) -> list[int]:
        """The promoted versions, oldest first, as the serving log replays (rollbacks popped);
        versions that gc has removed since are dropped."""
        stack: list[int] = []
        for entry in self.serving:
            if entry.action == "rollback":
                if stack:
                    stack.pop()
            else:
                stack.append(entry.version)
        published = {v.version for v in self.versions}
        return [v for v in stack if v in published]

    def serving_version(self) -> int:
        """The version a server should serve: the top of the serving stack (``mmer promote``,
        ``mmer rollback``); the latest published version in a store that never promoted one."""
        stack = self.serving_stack()
        if stack:
            return stack[-1]
        latest = self.latest_version()
        if latest is None:
            raise StoreError("the store has no published merge version yet; run `mmer merge` first")
        return latest.version

    def promoted(self, version: int, action: str = "promote", at: str = "") -> Catalog:
        """This catalog with ``version`` promoted (or the top popped, ``action='rollback'``)."""
        entry = ServingRecord(len(self.serving) + 1, action, version, at)
        return dataclasses.replace(self, serving=self.serving + (entry,))

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


def commit_path(root: str, seq: int) -> str:
    return f"{root}/{CATALOG}/commits/{seq:08d}.json"


def pointer_path(root: str) -> str:
    return f"{root}/{CATALOG}/CURRENT"


def snapshot_dir(root: str, name: str) -> str:
    return f"{root}/{CATALOG}/snapshots/{name}"


@dataclass(frozen=True)
class CommitRecord:
    """``catalog/commits/<seq>.json``: which snapshot directory is snapshot ``seq``, and the
    sha256 of each of its Parquet files (a damaged catalog is found, never half-read)."""

    seq: int
    snapshot: str
    files: dict[str, str]


def read_pointer(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """The CURRENT hint: 0 for a store without commits. It may lag the latest commit (a writer
    killed between its commit and the hint update); readers look ahead from it."""
    path = pointer_path(root)
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        return 0
    try:
        seq = int(text.decode("ascii").strip())
        if seq < 0:
            raise ValueError(seq)
    except (UnicodeDecodeError, ValueError):
        raise StoreError(f"{path} is damaged: expected a snapshot number, found {text[:40]!r}; "
                         "`mmer verify --store ...` lists the committed snapshots") from None
    return seq


def latest_seq(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """The last committed snapshot: from the CURRENT hint, the commits that follow it."""
    seq = read_pointer(fs, root)
    while fs.exists(commit_path(root, seq + 1)):
        seq += 1
    return seq


def read_commit(fs: fsspec.AbstractFileSystem, root: str, seq: int) -> CommitRecord:
    path = commit_path(root, seq)
    try:
        record = json.loads(fs.cat_file(path))
        commit = CommitRecord(int(record["seq"]), str(record["snapshot"]), dict(record["files"]))
    except FileNotFoundError:
        raise StoreError(f"catalog snapshot {seq} has no commit record {path} (deleted?)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"catalog commit record {path} is damaged ({type(e).__name__}: {e})") from None
    tables = set(commit.files)
    if commit.seq != seq or not set(_SCHEMAS) - _OPTIONAL_TABLES <= tables <= set(_SCHEMAS) or "/" in commit.snapshot:
        raise StoreError(f"catalog commit record {path} is damaged (it does not describe snapshot {seq})")
    return commit


def read_parquet(data: bytes) -> pa.Table:
    """A Parquet file's table, from its bytes. From an Arrow buffer, on this thread: no Arrow I/O
    thread calls back into Python (one still doing so at interpreter exit aborts the process:
    exit 134). One file, so ``ParquetFile``, not ``read_table``: that builds a dataset, whose first
    use imports pyarrow's dataset and compute modules (0.06 s of every command)."""
    return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)


def read_snapshot_tables(fs: fsspec.AbstractFileSystem, root: str, commit: CommitRecord) -> dict[str, list]:
    """Every table of a committed snapshot, each file checked against its recorded sha256."""
    tables = {}
    for name, record_type in _SCHEMAS.items():
        if name not in commit.files:  # an optional table this snapshot predates
            tables[name] = []
            continue
        path = f"{snapshot_dir(root, commit.snapshot)}/{name}.parquet"
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise StoreError(f"catalog snapshot {commit.seq}: {path} is missing") from None
        if hashlib.sha256(data).hexdigest() != commit.files[name]:
            raise StoreError(f"catalog snapshot {commit.seq}: {path} is damaged (its sha256 differs from the one "
                             f"recorded at commit; {len(data)} bytes)")
        try:
            tables[name] = _from_table(read_parquet(data), record_type)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise StoreError(f"catalog snapshot {commit.seq}: {path} does not parse ({e})") from None
    return tables


def read_catalog(fs: fsspec.AbstractFileSystem, root: str) -> Catalog:
    seq = latest_seq(fs, root)
    if seq == 0:
        return Catalog()
    tables = read_snapshot_tables(fs, root, read_commit(fs, root, seq))
    store = tables["store"][0] if tables["store"] else None
    return Catalog(seq, store, tuple(tables["models"]), tuple(tables["tensors"]), tuple(tables["versions"]),
                   tuple(tables["serving"]))


def write_catalog(fs: fsspec.AbstractFileSystem, root: str, catalog: Catalog, expected_seq: int) -> Catalog:
    """Publish ``catalog`` as snapshot expected_seq + 1.

    The snapshot's files go to a directory of their own (a unique name: a concurrent writer's
    files never mix with ours); the commit is the exclusive creation of ``commits/<seq>.json``,
    so of two writers that start from the same snapshot exactly one commits and the other is
    told, with nothing of its own visible. CURRENT is updated afterwards as a hint."""
    current = latest_seq(fs, root)
    if current != expected_seq:
        raise StoreError(_changed(current, expected_seq))
    seq = expected_seq + 1
    name = f"{seq:08d}-{uuid.uuid4().hex[:12]}"
    rows = {"store": [catalog.store] if catalog.store else [], "models": list(catalog.models),
            "tensors": list(catalog.tensors), "versions": list(catalog.versions), "serving": list(catalog.serving)}
    digests = {}
    try:
        fs.makedirs(snapshot_dir(root, name), exist_ok=True)
        for table, record_type in _SCHEMAS.items():
            buf = io.BytesIO()
            pq.write_table(_to_table(rows[table], record_type), buf)
            digests[table] = hashlib.sha256(buf.getvalue()).hexdigest()
            fs.pipe_file(f"{snapshot_dir(root, name)}/{table}.parquet", buf.getvalue())
        commit = {"seq": seq, "snapshot": name, "files": digests}
        create_exclusive(fs, commit_path(root, seq), json.dumps(commit, sort_keys=True).encode())
    except FileExistsError:
        _remove_quietly(fs, snapshot_dir(root, name))
        raise StoreError(_changed(seq, expected_seq)) from None
    except BaseException:
        _remove_quietly(fs, snapshot_dir(root, name))
        raise
    try:
        atomic_put(fs, pointer_path(root), f"{seq}\n".encode())
    except OSError:
        pass  # committed already; a stale hint only makes readers look one commit further
    return dataclasses.replace(catalog, seq=seq)


def _changed(current: int, expected: int) -> str:
    return (f"the catalog changed while this operation ran (snapshot {current}, expected {expected}); "
            "another writer committed first and nothing of this run was published — re-run it")


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError:
        pass  # left for `mmer gc`


def details_json(**parts) -> str:
    return json.dumps(parts, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))

