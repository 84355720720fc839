"""Ingest: stream checkpoints into the store, tensor by tensor, validating as they go.

A base (HF Llama-family causal LM) creates the store; each fine-tuned MLLM is split by its
format's key mapping into its LLM part (stored under the base's key names, on the base's chunk
grid) and its modality component (encoder + connector weights and every config / tokenizer /
processor file, kept together). Memory stays bounded by one row block: no step loads a model.

Everything is checked before the first byte is written (keys, architecture, shapes, dtypes);
NaN/Inf are found while streaming, before the catalog commit. A model becomes visible only at
that commit, so an interrupted ingest leaves the store as it was, and a re-run starts clean.
Alongside the weights, ingest records each tensor's high-digit histogram of |theta_i - theta_pre|
so that merges (and later additions) can pick exact top-K thresholds without that pass.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmer_dist.errors import FormatError, InvalidInputError, StoreError
from mmer_dist.formats.checkpoint import CheckpointReader
from mmer_dist.formats.detect import detect_format
from mmer_dist.formats.mapping import FormatMapping
from mmer_dist.formats.writer import SafetensorsWriter
from mmer_dist.method import select
from mmer_dist.method.kernels import ChunkInfo, ChunkKernels
from mmer_dist.method.settings import MergeSettings
from mmer_dist.method.validate import check_finite, check_lam
from mmer_dist.store import layout
from mmer_dist.ingest_files import CheckpointFiles, needed_files
from mmer_dist.merge.progress import progress_bar
from mmer_dist.store.catalog import ModelRecord, StoreRecord, TensorRecord, read_parquet
from mmer_dist.store.files import ManifestWriter
from mmer_dist.store.store import ArraySpec, Store, check_model_id, utc_now

ARCH_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
from mmer_dist.store.layout import COMPONENT_WEIGHTS  # noqa: E402  (re-exported for readers)
KEYMAP = "keymap.json"
HISTOGRAM = "magnitude_histogram.parquet"


def _arch(config: dict) -> dict:
    arch = {k: config.get(k) for k in ARCH_FIELDS}
    if arch["num_key_value_heads"] is None:
        arch["num_key_value_heads"] = arch["num_attention_heads"]
    return arch


def _layer_of(name: str, n_layers: int) -> int:
    m = _LAYER.match(name)
    if m:
        return int(m.group(1))
    return -1 if "embed" in name else n_layers


def _matrix_rows(reader: CheckpointReader, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor's 2-D (rows, cols) view (a 1-D tensor is one row)."""
    if len(reader.info(key).shape) <= 1:
        return reader.read(key).reshape(1, -1)
    block = reader.read_rows(key, start, stop)
    return block.reshape(block.shape[0], -1)


def _nbytes(info) -> int:
    return int(torch.Size(info.shape).numel()) * info.dtype.itemsize


def _progress(total: int, desc: str, enabled: bool):
    return progress_bar(desc, total, enabled, unit="B")


# -- base ---------------------------------------------------------------------------------------


def ingest_base(url: str, path: str | Path, *, chunk_elems: int = layout.DEFAULT_CHUNK_ELEMS,
                progress: bool = True) -> StoreRecord:
    """Create the store at ``url`` from a base HF Llama-family checkpoint."""
    reader = CheckpointReader(path)
    fmt = detect_format(reader)
    if fmt != "llama":
        raise FormatError(f"{path}: the base must be a Llama-family causal LM checkpoint, detected {fmt!r}")
    mapping = FormatMapping.load("llama")
    split = mapping.split(reader.keys())
    if split.unknown or split.component:
        raise FormatError(f"{path}: unexpected keys in the base checkpoint: {(split.unknown + split.component)[:8]}")
    config = mapping.llm_config(reader.config)
    n_layers = int(config["num_hidden_layers"])

    files = needed_files(reader)  # refuses links out of the checkpoint before anything is written
    store = Store.open(url) if Store.exists(url) else Store.create(url)
    started = time.time()
    with store.writer_lock():
        catalog = store.catalog()  # under the lock: another base ingest may have committed meanwhile
        if catalog.store is not None:
            raise StoreError(f"store {url!r} already has a base model; one store holds one base")
        store.remove("base")  # left over from an interrupted base ingest (never committed)
        hashing = _hash_in_background(reader)
        try:
            records = _write_base(store, reader, split, n_layers, chunk_elems, progress)
            _copy_aux_files(store, files, "base", layout.BASE_FILES.removeprefix("base/")).close()
        except BaseException:
            with contextlib.suppress(OSError):  # else `mmer gc` removes it later
                store.remove("base")  # a failed or interrupted ingest leaves nothing behind
            raise
        store_record = StoreRecord(layout.STORE_LAYOUT_VERSION, utc_now(), str(path), hashing.result(),
                                   records[0].dtype, json.dumps(config, sort_keys=True), chunk_elems)
        store.commit(catalog.replace(store=store_record, tensors=tuple(records)), catalog.seq)
    if progress:
        print(f"ingested base: {len(records)} tensors, {sum(r.numel for r in records):,} parameters "
              f"in {time.time() - started:.1f}s")
    return store_record


def _hash_in_background(reader: CheckpointReader) -> Future:
    """The checkpoint's digest, computed on a helper thread while the main one streams the
    tensors (hashlib releases the GIL; the bytes come from the page cache the stream fills)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmer-hash")
    future = pool.submit(reader.sha256)
    pool.shutdown(wait=False)
    return future


def _write_base(store: Store, reader: CheckpointReader, split, n_layers: int, chunk_elems: int,
                progress: bool) -> list[TensorRecord]:
    records = []
    names = sorted(split.llm, key=lambda n: (_layer_of(n, n_layers), n))
    total = sum(_nbytes(reader.info(split.llm[n])) for n in names)
    for name in names:
        info = reader.info(split.llm[name])
        dtype = layout.dtype_name(info.dtype) if info.dtype.is_floating_point else None
        if dtype is None:
            raise FormatError(f"base, tensor {name!r}: dtype {info.dtype} is not floating point")
        rows, cols = layout.matrix_shape(tuple(info.shape))
        records.append(TensorRecord(name, list(info.shape), dtype, rows, cols,
                                    layout.rows_per_chunk(tuple(info.shape), chunk_elems, info.dtype.itemsize),
                                    _layer_of(name, n_layers), name in VOCAB_TENSORS))
    store.create_arrays([ArraySpec(f"{layout.BASE_LLM}/{r.name}", r.rows, r.cols, r.rows_per_chunk, r.dtype)
                         for r in records])
    with _progress(total, "ingest base", progress) as update:
        for record in records:
            name = record.name
            for start in range(0, record.rows, record.rows_per_chunk):
                stop = min(record.rows, start + record.rows_per_chunk)
                block = _matrix_rows(reader, split.llm[name], start, stop)
                check_finite(block, "base", name, offset=start * record.cols)
                store.write_chunk(f"{layout.BASE_LLM}/{name}", start, block)
                update(block.numel() * block.element_size())
    return records


def _copy_aux_files(store: Store, files: CheckpointFiles, owner: str, dest: str) -> ManifestWriter:
    """Copy the checkpoint's needed files to ``<owner>/<dest>/``; returns the owner's manifest
    writer (the caller adds its other files and closes it)."""
    manifest = ManifestWriter(store, owner)
    for rel, f in files.needed:
        with open(f, "rb") as src:
            manifest.put_stream(f"{dest}/{rel}", src)
    return manifest


# -- fine-tuned models --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A fine-tuned checkpoint, opened and checked on its own (id, lambda, format, files) before
    any store is touched; ``ingest_source`` writes it."""

    model_id: str
    path: str | Path  # as given: the catalog records it
    modality: str
    reader: CheckpointReader
    mapping: FormatMapping
    files: CheckpointFiles
    lam: float = 1.0
    task: str | None = None


def open_model(model_id: str, path: str | Path, modality: str, *, fmt: str | None = None,
               mapping_file: str | Path | None = None, lam: float = 1.0, task: str | None = None) -> ModelSource:
    """Open one fine-tuned checkpoint and resolve its format; every error names the model."""
    check_model_id(model_id)
    check_lam(lam, model_id)
    if not modality:
        raise InvalidInputError(f"model {model_id!r}: a modality name is required (e.g. image, audio)")
    reader = CheckpointReader(path)
    mapping = _resolve_mapping(reader, fmt, mapping_file)
    files = needed_files(reader)  # refuses links out of the checkpoint before anything is written
    return ModelSource(model_id, path, modality, reader, mapping, files, float(lam), task)


def check_against_base(catalog, source: ModelSource) -> None:
    """Raise what ingesting ``source`` into a store with this catalog would raise before writing
    (architecture, tensors, dtypes); an early check only, the ingest repeats it under the lock."""
    _plan_model(catalog, source.reader, source.mapping, source.model_id)


def ingest_model(url: str, model_id: str, path: str | Path, modality: str, *, fmt: str | None = None,
                 mapping_file: str | Path | None = None, lam: float = 1.0, task: str | None = None,
                 progress: bool = True) -> ModelRecord:
    """Add one fine-tuned MLLM to the store (not merged until the next ``merge``). ``task`` names
    what it was fine-tuned for (a new task of an existing modality, say)."""
    source = open_model(model_id, path, modality, fmt=fmt, mapping_file=mapping_file, lam=lam, task=task)
    return ingest_source(url, source, progress=progress)


def ingest_source(url: str, source: ModelSource, *, progress: bool = True) -> ModelRecord:
    """Write an opened model into the store and commit its catalog record."""
    model_id, path, modality, lam, task = source.model_id, source.path, source.modality, source.lam, source.task
    reader, mapping, files = source.reader, source.mapping, source.files
    store = Store.open(url)
    started = time.time()
    with store.writer_lock():
        # Every check against the catalog happens under the lock, before anything is touched:
        # a model committed by another writer is never removed or overwritten.
        catalog = store.catalog()
        if catalog.store is None:
            raise StoreError(f"store {url!r} has no base model yet; ingest one with --base first")
        if catalog.has_model(model_id):
            raise InvalidInputError(f"model id {model_id!r} is already in the store; pick another id")
        plan = _plan_model(catalog, reader, mapping, model_id)
        store.remove(layout.model_root(model_id))  # an interrupted earlier attempt, never committed
        hashing = _hash_in_background(reader)
        try:
            component_params = _write_model(store, catalog, reader, plan, files, model_id, progress)
            record = ModelRecord(
                id=model_id, modality=modality, format=mapping.name, source=str(path), dtype=plan.dtype,
                params=sum(t.numel for t in catalog.tensors), extra_rows=plan.extra_rows,
                component_params=component_params, sha256=hashing.result(), lam=float(lam),
                ingested_at=utc_now(), ingest_seconds=round(time.time() - started, 3), task=task)
            store.commit(catalog.replace(models=catalog.models + (record,)), catalog.seq)
        except BaseException:
            # NaN/Inf found while streaming, a read error, a full disk, Ctrl-C, a lost commit race:
            # the model was never visible; leave no partial copy behind either
            _discard_uncommitted(store, model_id)
            raise
    if progress:
        print(f"ingested {model_id!r} ({mapping.name}, {modality}): {record.params:,} LLM parameters, "
              f"{record.component_params:,} component parameters in {record.ingest_seconds:.1f}s")
        if files.left_out:
            print(f"  not copied (not needed by the model): {', '.join(files.left_out[:8])}"
                  + (f" and {len(files.left_out) - 8} more" if len(files.left_out) > 8 else ""))
    return record


def _discard_uncommitted(store: Store, model_id: str) -> None:
    """Remove ``models/<id>/`` after a failed ingest, unless the catalog lists that model (a
    writer that took a lease judged dead may have committed it: its files are never touched)."""
    try:
        committed = store.catalog().has_model(model_id)
    except Exception:  # an unreadable catalog: keep the files, `mmer gc` decides later
        return
    if not committed:
        try:
            store.remove(layout.model_root(model_id))
        except OSError:
            pass  # the original error matters more; `mmer gc` removes the leftovers later


def _write_model(store: Store, catalog, reader: CheckpointReader, plan: ModelPlan, files: CheckpointFiles,
                 model_id: str, progress: bool) -> int:
    """Write everything of one model under ``models/<id>/``; returns its component parameter
    count. The caller commits the record."""
    histograms = _write_llm(store, catalog, reader, plan, model_id, progress)
    manifest = _copy_aux_files(store, files, layout.model_root(model_id), "component/files")
    component_params = _write_component(store, manifest, reader, plan.component, model_id, progress)
    manifest.put_bytes(f"meta/{KEYMAP}", json.dumps(plan.llm, indent=1).encode())
    _write_histograms(manifest, histograms)
    manifest.close()
    return component_params


def _resolve_mapping(reader: CheckpointReader, fmt: str | None, mapping_file) -> FormatMapping:
    if mapping_file is not None:
        if fmt not in (None, "generic"):
            raise InvalidInputError(f"--mapping is for --format generic, not {fmt!r}")
        return FormatMapping.load(str(mapping_file))
    if fmt == "generic":
        raise InvalidInputError("--format generic needs --mapping FILE describing the key prefixes")
    return FormatMapping.load(fmt or detect_format(reader))


@dataclass(frozen=True)
class ModelPlan:
    """A validated model, ready to write: canonical -> source LLM keys, component keys, the
    LLM dtype (name) and the number of vocabulary rows beyond the base's."""

    llm: dict[str, str]
    component: list[str]
    dtype: str
    extra_rows: int


def _plan_model(catalog, reader: CheckpointReader, mapping: FormatMapping, model_id: str) -> ModelPlan:
    """Validate a model against the base before anything is written; returns the write plan."""
    where = f"model {model_id!r} ({reader.path})"
    split = mapping.split(reader.keys())
    if split.unknown:
        raise FormatError(f"{where}: {len(split.unknown)} keys belong to neither the LLM nor the "
                          f"modality component of format {mapping.name!r}: {split.unknown[:8]}")
    base_config = json.loads(catalog.store.base_config)
    model_config = mapping.llm_config(reader.config)
    for key, want in _arch(base_config).items():
        got = _arch(model_config)[key]
        if got != want:
            raise FormatError(f"{where}: architecture differs from the base: {key} is {got}, the base has {want}")
    tensors = catalog.tensor_map()
    missing = sorted(set(tensors) - set(split.llm))
    if missing:
        raise FormatError(f"{where}: {len(missing)} base tensors are missing, e.g. {missing[:5]}")
    extra = sorted(set(split.llm) - set(tensors))
    if extra:
        raise FormatError(f"{where}: LLM tensors the base does not have: {extra[:5]}")
    dtypes, extra_rows, vocab_seen = set(), 0, None
    for name, record in tensors.items():
        info = reader.info(split.llm[name])
        if not info.dtype.is_floating_point or info.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise FormatError(f"{where}, tensor {name!r}: dtype {info.dtype} is not float32/float16/bfloat16")
        dtypes.add(info.dtype)
        shape = list(info.shape)
        if record.vocab_rows and len(shape) == 2 and shape[1:] == record.shape[1:] and shape[0] >= record.shape[0]:
            # every vocabulary tensor (embedding, LM head) must carry the same extra rows, 0 included
            rows = shape[0] - record.shape[0]
            if vocab_seen is not None and rows != extra_rows:
                raise FormatError(f"{where}, tensor {name!r}: {rows} extra vocabulary rows, but {vocab_seen!r} "
                                  f"has {extra_rows}")
            extra_rows, vocab_seen = rows, name
        elif shape != record.shape:
            raise FormatError(f"{where}, tensor {name!r}: shape {tuple(shape)} differs from the base's {tuple(record.shape)}")
    if len(dtypes) > 1:
        raise FormatError(f"{where}: LLM tensors mix dtypes {sorted(map(str, dtypes))}")
    # fine-tunes may differ in dtype from the base and from each other (each is stored as it
    # came, losslessly); a merge reads them upcast to float32, which holds every value exactly
    dtype = layout.dtype_name(dtypes.pop())
    return ModelPlan(split.llm, split.component, dtype, extra_rows)


def _histogram_kernels(params: int, model_id: str) -> ChunkKernels:
    """The high-digit key kernel of |theta_i - theta_pre|: compiled (ahead of time, cached on
    disk, like the merge's) for models where that pays, eager for small ones."""
    from mmer_dist.merge.options import COMPILE_THRESHOLD

    fuse = None
    if params >= COMPILE_THRESHOLD:
        from mmer_dist.merge.kernel_cache import aot_fuser

        fuse = aot_fuser()
    return ChunkKernels(MergeSettings(lams=(1.0,)), [model_id], fuse=fuse)


def _write_llm(store: Store, catalog, reader, plan, model_id, progress) -> dict[str, select.SparseCounts]:
    histograms = {}
    total = sum(t.numel for t in catalog.tensors) * layout.torch_dtype(plan.dtype).itemsize
    kernels = _histogram_kernels(sum(t.numel for t in catalog.tensors), model_id)
    # one buffer for the base's rows, reused chunk after chunk
    buffer = torch.empty(max(t.rows_per_chunk * t.cols for t in catalog.tensors) * 4, dtype=torch.uint8)
    store.create_arrays([ArraySpec(f"{layout.model_llm(model_id)}/{r.name}", r.rows, r.cols, r.rows_per_chunk,
                                   plan.dtype) for r in catalog.tensors])
    with _progress(total, f"ingest {model_id}", progress) as update:
        for record in catalog.tensors:
            source = plan.llm[record.name]
            path = f"{layout.model_llm(model_id)}/{record.name}"
            dense = torch.zeros(2 * select.HIGH_BINS, dtype=torch.int64)
            for start in range(0, record.rows, record.rows_per_chunk):
                stop = min(record.rows, start + record.rows_per_chunk)
                block = _matrix_rows(reader, source, start, stop)
                base = store.read_stacked([f"{layout.BASE_LLM}/{record.name}"], start, stop, buffer)[0]
                if _add_magnitude_counts(dense, kernels, record, start, block, base):
                    # |theta_i - theta_pre| is not finite (the base is): locate the bad entry
                    check_finite(block, model_id, record.name, offset=start * record.cols)
                store.write_chunk(path, start, block)
                update(block.numel() * block.element_size())
            histograms[record.name] = select.sparse_high_counts(dense, 1)
            if record.vocab_rows and plan.extra_rows:
                _write_extra_rows(store, reader, source, record, plan.extra_rows, model_id)
    return histograms


def _add_magnitude_counts(dense: torch.Tensor, kernels: ChunkKernels, record: TensorRecord, start: int,
                          block: torch.Tensor, base: torch.Tensor, block_elems: int = 1 << 20) -> bool:
    """Add the high-digit counts of |block - base| (float32) to ``dense``, in row blocks of ~1M
    entries (kernel temporaries stay in cache); True if any |delta| is not finite. Counts are
    accumulated dense per tensor and sparsified once (not per block)."""
    step = max(1, block_elems // max(1, block.shape[1]))
    nonfinite = False
    for a in range(0, block.shape[0], step):
        info = ChunkInfo(record.name, record.name, (start + a) * record.cols, len(record.shape))
        counts = select.dense_high_counts(kernels.high_keys(block[None, a:a + step], base[a:a + step], info))
        nonfinite = nonfinite or bool(counts[2 * select.NONFINITE_HIGH:].any())
        dense += counts
    return nonfinite


def _write_extra_rows(store, reader, source, record, n_extra, model_id) -> None:
    path = f"{layout.model_extra(model_id)}/{record.name}"
    store.create_array(path, n_extra, record.cols, max(1, min(n_extra, record.rows_per_chunk)), layout.dtype_name(reader.info(source).dtype))
    for start in range(0, n_extra, record.rows_per_chunk):
        stop = min(n_extra, start + record.rows_per_chunk)
        block = reader.read_rows(source, record.rows + start, record.rows + stop)
        check_finite(block, model_id, record.name, offset=(record.rows + start) * record.cols)
        store.write_rows(path, start, block)


def _write_component(store: Store, manifest: ManifestWriter, reader: CheckpointReader, keys: list[str],
                     model_id: str, progress) -> int:
    """Copy the modality component's tensors into one safetensors file, tensor by tensor."""
    if not keys:
        return 0
    entries = [(k, tuple(reader.info(k).shape), reader.info(k).dtype) for k in keys]
    with tempfile.TemporaryDirectory() as tmp:
        with SafetensorsWriter(tmp, entries, max_shard_bytes=1 << 62) as writer:
            for key in keys:
                tensor = reader.read(key)
                check_finite(tensor, model_id, key)
                writer.write(key, 0, tensor)
        produced = sorted(Path(tmp).glob("*.safetensors"))
        with open(produced[0], "rb") as src:
            manifest.put_stream(f"component/{COMPONENT_WEIGHTS}", src)
    return sum(int(torch.Size(shape).numel()) for _, shape, _ in entries)


def _write_histograms(manifest: ManifestWriter, histograms: dict[str, select.SparseCounts]) -> None:
    names, keys, total, floor = [], [], [], []
    for name, h in histograms.items():
        names += [name] * h.keys.numel()
        keys += h.keys.tolist()
        total += h.counts[0, 0].tolist()
        floor += h.counts[1, 0].tolist()
    table = pa.table({"tensor": names, "key": keys, "count": total, "floor": floor},
                     schema=pa.schema([("tensor", pa.string()), ("key", pa.int64()), ("count", pa.int64()),
                                       ("floor", pa.int64())]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    manifest.put_bytes(f"meta/{HISTOGRAM}", buf.getvalue())


def read_histograms(store: Store, model_id: str) -> dict[str, select.SparseCounts]:
    """Per tensor: high-digit counts (2, M) of |theta_i - theta_pre| recorded at ingest."""
    table = read_parquet(store.get_bytes(f"{layout.model_meta(model_id)}/{HISTOGRAM}"))
    names = table.column("tensor").to_numpy(zero_copy_only=False)
    keys = table.column("key").to_numpy()
    counts = np.stack([table.column("count").to_numpy(), table.column("floor").to_numpy()])
    # each tensor's rows are contiguous: they were written tensor by tensor
    cuts = np.flatnonzero(names[1:] != names[:-1]) + 1
    return {str(names[a]): select.SparseCounts(torch.from_numpy(keys[a:b].copy()), torch.from_numpy(counts[:, a:b].copy()))
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(names)])}


def read_keymap(store: Store, model_id: str) -> dict[str, str]:
    return json.loads(store.get_bytes(f"{layout.model_meta(model_id)}/{KEYMAP}"))

