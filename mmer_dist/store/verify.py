"""Check a whole store and name what is damaged: ``mmer verify``.

- the catalog: the CURRENT hint, every commit record, every snapshot's Parquet files (their
  sha256 as recorded at commit, and that they parse);
- every array the latest snapshot refers to (base, models, extra vocabulary rows, each
  version's tau* and masks): metadata readable, shape as the catalog says, every chunk present
  and passing its crc32c checksum;
- every plain file in the base's and each model's manifest: present, size and sha256 as recorded.

Reads everything once; nothing is written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mmer_dist.errors import StoreError
from mmer_dist.store import layout
from mmer_dist.store.catalog import Catalog, commit_path, read_catalog, read_commit, read_pointer, read_snapshot_tables
from mmer_dist.store.chunks import MissingChunkError, all_chunk_keys
from mmer_dist.store.files import read_manifest
from mmer_dist.store.store import Store


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    snapshots: int = 0
    arrays: int = 0
    chunks: int = 0
    files: int = 0

    def summary(self) -> str:
        return (f"{self.snapshots} catalog snapshots, {self.arrays} arrays ({self.chunks} chunks), "
                f"{self.files} files checked")


def expected_arrays(catalog: Catalog) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(array path, shape) of every array the catalog refers to."""
    for t in catalog.tensors:
        yield f"{layout.BASE_LLM}/{t.name}", (t.rows, t.cols)
    for m in catalog.models:
        for t in catalog.tensors:
            yield f"{layout.model_llm(m.id)}/{t.name}", (t.rows, t.cols)
            if t.vocab_rows and m.extra_rows:
                yield f"{layout.model_extra(m.id)}/{t.name}", (m.extra_rows, t.cols)
    for v in catalog.versions:
        for t in catalog.tensors:
            yield f"{layout.version_tau_star(v.version)}/{t.name}", (t.rows, t.cols)
            yield f"{layout.version_masks(v.version)}/{t.name}", (len(v.models), t.rows, layout.packed_cols(t.cols))


def _check_catalog(store: Store, report: Report) -> Catalog | None:
    fs, root = store.fs, store.root
    try:
        read_pointer(fs, root)
    except StoreError as e:
        report.problems.append(str(e))
    seq = 0
    while fs.exists(commit_path(root, seq + 1)):  # every commit, whatever CURRENT says
        seq += 1
    for s in range(1, seq + 1):
        try:
            read_snapshot_tables(fs, root, read_commit(fs, root, s))
            report.snapshots += 1
        except StoreError as e:
            report.problems.append(str(e))
    try:
        return read_catalog(fs, root)
    except StoreError as e:
        if str(e) not in report.problems:
            report.problems.append(str(e))
        return None


def _check_array(store: Store, path: str, shape: tuple[int, ...], report: Report) -> None:
    try:
        arr = store.checked_array(path)
    except StoreError as e:
        report.problems.append(str(e))
        return
    report.arrays += 1
    if tuple(arr.shape) != shape:
        report.problems.append(f"array {path!r} has shape {tuple(arr.shape)}, the catalog says {shape}")
        return
    for coords, key in all_chunk_keys(arr):
        report.chunks += 1
        try:
            arr.get_block_selection(coords)
        except MissingChunkError:
            report.problems.append(f"array {path!r} chunk {key!r} is missing")
        except Exception as e:  # crc32c mismatch, undecodable bytes
            report.problems.append(f"array {path!r} chunk {key!r} is damaged ({type(e).__name__}: {e})")


def _check_files(store: Store, owner: str, report: Report) -> None:
    try:
        manifest = read_manifest(store, owner)
    except StoreError as e:
        report.problems.append(str(e))
        return
    for rel, entry in sorted(manifest.items()):
        report.files += 1
        path = f"{owner}/{rel}"
        digest, size = hashlib.sha256(), 0
        try:
            with store.open_file(path) as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    size += len(block)
        except FileNotFoundError:
            report.problems.append(f"file {path} is missing")
            continue
        if size != entry.size or digest.hexdigest() != entry.sha256:
            report.problems.append(f"file {path} is damaged ({size} bytes; the manifest records {entry.size} "
                                   "and a different sha256)")


def verify_store(url: str, progress: Callable[[str], None] | None = None) -> Report:
    store = Store.open(url)
    report = Report()
    catalog = _check_catalog(store, report)
    if catalog is None:
        return report
    arrays = list(expected_arrays(catalog))
    for i, (path, shape) in enumerate(arrays):
        if progress:
            progress(f"[{i + 1}/{len(arrays)}] {path}")
        _check_array(store, path, shape, report)
    if catalog.store is not None:
        _check_files(store, "base", report)
    for m in catalog.models:
        _check_files(store, layout.model_root(m.id), report)
    return report
