"""``mmer ingest --manifest FILE``: the base and many fine-tuned models in one command.

One process pays the start-up (Python, torch, the store) once instead of once per model, and
every model is checked before the first one is written. The manifest is YAML (JSON is YAML too)::

    base: ./vicuna-7b                # optional: creates the store first
    chunk_elems: 4194304             # optional, only with base
    models:
      - id: llava
        path: ./llava-1.5-7b-hf      # relative paths are relative to the manifest's folder
        modality: image
      - id: audio
        path: ./my-audio-llm
        modality: audio
        format: generic              # optional (default: detected), as `--format`
        mapping: audio.json          # as `--mapping`
        lam: 0.6                     # as `--lam`
        task: speech-qa              # optional: what it was fine-tuned for

Each model is committed on its own, in order, as `mmer ingest --model` would. A model id already
in the store *from the same path* is skipped, so re-running a manifest after an interruption
continues where it stopped; the same id from another path is refused before anything is written.
A damaged checkpoint (truncated, a header that does not parse, non-finite weights) is refused
with its reason, naming it, and the other models are ingested all the same: the command then
exits with an error listing the refused ones, and a re-run after replacing them ingests just those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmer_dist import ingest
from mmer_dist.errors import CorruptCheckpointError, InvalidInputError, MmerError, StoreError
from mmer_dist.formats.mapping import FORMAT_NAMES
from mmer_dist.store import layout
from mmer_dist.store.store import Store

TOP_FIELDS = ("base", "chunk_elems", "models")
MODEL_FIELDS = ("id", "path", "modality", "format", "mapping", "lam", "task")


@dataclass(frozen=True)
class ManifestModel:
    id: str
    path: Path
    modality: str
    format: str | None = None
    mapping: Path | None = None
    lam: float = 1.0
    task: str | None = None


@dataclass(frozen=True)
class Manifest:
    source: Path
    base: Path | None
    chunk_elems: int | None
    models: tuple[ManifestModel, ...]


def load_manifest(path: str | Path) -> Manifest:
    """Parse and check a manifest; every error names the file, the entry and the field."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"manifest {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"manifest {path}: cannot read it ({e})") from None
    except yaml.YAMLError as e:
        raise InvalidInputError(f"manifest {path}: not valid YAML ({' '.join(str(e).split())})") from None
    where = f"manifest {path}"
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{where}: expected a mapping with 'models' (and optionally 'base'), got {type(doc).__name__}")
    _refuse_unknown(doc, TOP_FIELDS, where)
    folder = path.parent
    base = _path_field(doc, "base", folder, where) if doc.get("base") is not None else None
    chunk_elems = doc.get("chunk_elems")
    if chunk_elems is not None:
        if base is None:
            raise InvalidInputError(f"{where}: 'chunk_elems' is fixed by the base (the store's chunk grid); "
                                    "it goes with 'base'")
        if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems < 1:
            raise InvalidInputError(f"{where}: 'chunk_elems' must be a whole number >= 1, got {chunk_elems!r}")
    entries = doc.get("models") or []
    if not isinstance(entries, list):
        raise InvalidInputError(f"{where}: 'models' must be a list of models, got {type(entries).__name__}")
    if base is None and not entries:
        raise InvalidInputError(f"{where}: nothing to ingest (no 'base' and no 'models')")
    models, seen = [], set()
    for i, entry in enumerate(entries):
        models.append(_model_entry(entry, i, folder, where))
        if models[-1].id in seen:
            raise InvalidInputError(f"{where}: model id {models[-1].id!r} is listed twice")
        seen.add(models[-1].id)
    return Manifest(path, base, chunk_elems, tuple(models))


def _model_entry(entry, i: int, folder: Path, where: str) -> ManifestModel:
    if not isinstance(entry, dict):
        raise InvalidInputError(f"{where}, models[{i}]: expected a mapping with id, path and modality")
    at = f"{where}, models[{i}]" + (f" ({entry['id']!r})" if isinstance(entry.get("id"), str) else "")
    _refuse_unknown(entry, MODEL_FIELDS, at)
    for field in ("id", "path", "modality"):
        if not isinstance(entry.get(field), str) or not entry[field]:
            raise InvalidInputError(f"{at}: '{field}' is required (a non-empty string)")
    for field in ("format", "mapping", "task"):
        if entry.get(field) is not None and not isinstance(entry[field], str):
            raise InvalidInputError(f"{at}: '{field}' must be a string, got {entry[field]!r}")
    if entry.get("format") is not None and entry["format"] not in FORMAT_NAMES:
        raise InvalidInputError(f"{at}: unknown format {entry['format']!r}; one of {', '.join(FORMAT_NAMES)}")
    lam = entry.get("lam", 1.0)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise InvalidInputError(f"{at}: 'lam' must be a number, got {lam!r}")
    return ManifestModel(entry["id"], _path_field(entry, "path", folder, at), entry["modality"], entry.get("format"),
                         _path_field(entry, "mapping", folder, at) if entry.get("mapping") else None,
                         float(lam), entry.get("task"))


def _refuse_unknown(doc: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [str(k) for k in doc if k not in allowed]
    if unknown:
        raise InvalidInputError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                                f"allowed: {', '.join(allowed)}")


def _path_field(doc: dict, field: str, folder: Path, where: str) -> Path:
    value = doc[field]
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{where}: '{field}' must be a path (a non-empty string), got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (folder / p).absolute()


def ingest_manifest(url: str, manifest: Manifest, *, progress: bool = True, log=print) -> dict[str, list[str]]:
    """Ingest what ``manifest`` lists into the store at ``url``; returns the model ids ingested and
    skipped. Every model is opened and checked (format, files, then architecture against the
    base) before the first model is written."""
    started = time.perf_counter()
    sources, refused = [], {}
    for m in manifest.models:
        try:
            sources.append(ingest.open_model(m.id, m.path, m.modality, fmt=m.format, mapping_file=m.mapping,
                                             lam=m.lam, task=m.task))
        except CorruptCheckpointError as e:  # the checkpoint's own damage: the other models go on
            refused[m.id] = str(e)
        except MmerError as e:
            raise type(e)(f"manifest {manifest.source}, model {m.id!r}: {e}") from None
    base_ingested = _ingest_base(url, manifest, progress)
    store = Store.open(url)
    catalog = store.catalog()
    if catalog.store is None:
        raise StoreError(f"store {url!r} has no base model yet; add 'base:' to the manifest or ingest one with --base")
    todo, skipped = [], []
    for source in sources:
        if catalog.has_model(source.model_id):
            recorded = catalog.model(source.model_id).source
            if recorded != str(source.path):
                raise InvalidInputError(f"manifest {manifest.source}: model id {source.model_id!r} is already in the "
                                        f"store, ingested from {recorded}, not {source.path}; pick another id")
            skipped.append(source.model_id)
            continue
        ingest.check_against_base(catalog, source)
        todo.append(source)
    if skipped and progress:
        log(f"already in the store from the same path, skipped: {', '.join(skipped)}")
    ingested = []
    for source in todo:
        try:
            ingest.ingest_source(url, source, progress=progress)
        except InvalidInputError as e:  # its weights (non-finite, cut short): nothing of it was committed
            refused[source.model_id] = str(e)
        else:
            ingested.append(source.model_id)
    if progress:
        what = (["the base"] if base_ingested else []) + ([f"{len(ingested)} models"] if ingested else [])
        log(f"ingested {' and '.join(what) or 'nothing new'} in {time.perf_counter() - started:.1f}s")
    if refused:
        raise CorruptCheckpointError(_refusal(manifest, refused, len(ingested)))
    return {"ingested": ingested, "skipped": skipped}


def _refusal(manifest: Manifest, refused: dict[str, str], ingested: int) -> str:
    """One line: which models were refused and why, and what became of the others."""
    what = "; ".join(f"{model_id!r}: {reason}" for model_id, reason in refused.items())
    return (f"manifest {manifest.source}: refused {len(refused)} damaged checkpoint(s), {what}; the other "
            f"{ingested} new model(s) were ingested. Replace the damaged checkpoint(s) (or drop them from the "
            "manifest) and run it again: models already in the store are skipped")


def _ingest_base(url: str, manifest: Manifest, progress: bool) -> bool:
    """Create the store from the manifest's base; a store that already has this base is reused."""
    if manifest.base is None:
        return False
    if Store.exists(url):
        record = Store.open(url).catalog().store
        if record is not None:
            if record.base_source != str(manifest.base):
                raise InvalidInputError(f"manifest {manifest.source}: the store already has a base, ingested from "
                                        f"{record.base_source}, not {manifest.base}; one store holds one base")
            return False
    ingest.ingest_base(url, manifest.base, chunk_elems=manifest.chunk_elems or layout.DEFAULT_CHUNK_ELEMS,
                       progress=progress)
    return True
