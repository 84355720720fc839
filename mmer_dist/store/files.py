"""Plain files in the store (configs, tokenizers, component weights) and their manifest.

The base and each model own one prefix (``base``, ``models/<id>``); every plain file written
under it is listed in ``<owner>/MANIFEST.json`` with its size and sha256, the manifest written
last. Readers (export, verify) take file names from the manifest, check each name, and check
each file's bytes against it, so a damaged or planted file is found rather than exported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mmer_dist.errors import StoreError
from mmer_dist.store.store import Store

MANIFEST = "MANIFEST.json"


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the owner prefix
    size: int
    sha256: str


class ManifestWriter:
    """Collects the files an ingest writes under ``owner`` and writes their manifest at the end."""

    def __init__(self, store: Store, owner: str):
        self.store, self.owner = store, owner
        self.entries: dict[str, FileEntry] = {}

    def put_bytes(self, rel: str, data: bytes) -> None:
        self.store.put_bytes(f"{self.owner}/{rel}", data)
        self.entries[rel] = FileEntry(rel, len(data), hashlib.sha256(data).hexdigest())

    def put_stream(self, rel: str, src, block: int = 1 << 20) -> None:
        digest, size = hashlib.sha256(), 0
        with self.store.open_file(f"{self.owner}/{rel}", "wb") as dst:
            while chunk := src.read(block):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        self.entries[rel] = FileEntry(rel, size, digest.hexdigest())

    def close(self) -> None:
        body = {e.path: {"size": e.size, "sha256": e.sha256} for e in sorted(self.entries.values(), key=lambda e: e.path)}
        self.store.put_bytes(f"{self.owner}/{MANIFEST}", json.dumps(body, indent=1).encode())


def read_manifest(store: Store, owner: str) -> dict[str, FileEntry]:
    path = f"{owner}/{MANIFEST}"
    if not store.exists_path(path):
        raise StoreError(f"store {store.url!r}: {path} is missing (the file list of {owner!r})")
    try:
        body = json.loads(store.get_bytes(path))
        return {rel: FileEntry(rel, int(v["size"]), str(v["sha256"])) for rel, v in body.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StoreError(f"store {store.url!r}: {path} is damaged ({type(e).__name__}: {e})") from None


def owner_of(path: str) -> tuple[str, str]:
    """(owner prefix, the rest) of a store path: ``base`` or ``models/<id>``."""
    parts = path.strip("/").split("/")
    n = 1 if parts[0] == "base" else 2
    return "/".join(parts[:n]), "/".join(parts[n:])


def files_under(store: Store, prefix: str) -> list[tuple[str, FileEntry]]:
    """(name relative to ``prefix``, entry) for each manifest file under the store path ``prefix``."""
    owner, sub = owner_of(prefix)
    head = sub.rstrip("/") + "/" if sub else ""
    return [(rel[len(head):], e) for rel, e in sorted(read_manifest(store, owner).items()) if rel.startswith(head)]


def check_entry(store: Store, owner: str, entry: FileEntry, data_sha256: str, size: int) -> None:
    if data_sha256 != entry.sha256 or size != entry.size:
        raise StoreError(f"store {store.url!r}: file {owner}/{entry.path} is damaged ({size} bytes, sha256 "
                         f"{data_sha256[:12]}…; its manifest records {entry.size} bytes, {entry.sha256[:12]}…)")


def safe_join(dest: Path, name: str) -> Path:
    """``dest / name`` for a relative, '/'-separated file name read from a store, refusing
    anything that would land outside ``dest`` (absolute names, ``..``, links): a store may be
    shared, its names are not trusted."""
    parts = PurePosixPath(name).parts
    if (not name or "\\" in name or "\0" in name or name.startswith("/")
            or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]):
        raise StoreError(f"the store names a file {name!r}, which is not a plain relative name inside the output "
                         "directory; refusing to write it (the store may be damaged or hostile: `mmer verify`)")
    target = Path(dest).joinpath(*parts)
    if not target.resolve().is_relative_to(Path(dest).resolve()):
        raise StoreError(f"the store's file {name!r} would be written outside {dest} (through a link); refusing")
    return target


def copy_file(store: Store, path: str, target: Path, entry: FileEntry | None = None) -> None:
    """Copy one plain file of the store to a local path, its bytes checked against the manifest."""
    owner, rel = owner_of(path)
    if entry is None:
        entry = read_manifest(store, owner).get(rel)
        if entry is None:
            raise StoreError(f"store {store.url!r}: {path} is not in {owner}/{MANIFEST}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    try:
        with store.open_file(path) as src, open(target, "wb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                size += len(block)
                dst.write(block)
    except FileNotFoundError:
        raise StoreError(f"store {store.url!r}: file {path} is missing (listed in {owner}/{MANIFEST})") from None
    check_entry(store, owner, entry, digest.hexdigest(), size)


def copy_files(store: Store, prefix: str, dest: Path) -> None:
    """Copy the manifest's files under store path ``prefix`` into ``dest`` (names checked, bytes
    checked against their sha256)."""
    for name, entry in files_under(store, prefix):
        copy_file(store, f"{prefix}/{name}", safe_join(Path(dest), name), entry)
