"""Export: write standard HF checkpoints from the store, streaming row block by row block.

- ``export_model``: model i reconstructed, theta_hat_i = theta_pre + m_i * tau* (or, with
  ``original=True``, its stored theta_i bit for bit), with its own modality component, configs
  and key names, in the format it came in.
- ``export_merged``: theta* = theta_pre + alpha * tau* as a Llama checkpoint, from a version, or
  computed on the fly for a baseline method (ties, ta, naive, dare) without touching the store.
- ``export_text``: theta_bar = theta_pre + mean(m) * tau*, the weights text tokens run through.

Output goes to a sibling temporary directory renamed into place at the end, so a failed export
never leaves a directory that looks like a complete checkpoint (``mmer_dist/outputs.py``: what
``--overwrite`` may replace, and how file names from the store are checked).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmer_dist import outputs
from mmer_dist.errors import InvalidInputError
from mmer_dist.formats.checkpoint import SAFETENSORS_DTYPES, CheckpointReader, read_header
from mmer_dist.formats.writer import SafetensorsWriter
from mmer_dist.method import reconstruct, streaming
from mmer_dist.method.kernels import ChunkKernels
from mmer_dist.merge.engine import MergeRequest, cached_high_histogram, resolve_settings
from mmer_dist.merge.passes import StoreChunkReader
from mmer_dist.merge.plan import tensor_chunks
from mmer_dist.store import layout
from mmer_dist.store.catalog import Catalog, TensorRecord
from mmer_dist.ingest import read_keymap
from mmer_dist.store.store import Store
from mmer_dist.store.weights import StoreWeights, VersionWeights

DEFAULT_SHARD_BYTES = 2 * 1024**3
BASELINES = ("ties", "ta", "naive", "dare", "neuro")


# what an export may write and replace: mmer_dist/outputs.py
_staged_output = outputs.staged_output


def _stream_llm(store: Store, catalog: Catalog, writer: SafetensorsWriter, names: dict[str, str], dtype: torch.dtype,
                block_fn: Callable[[TensorRecord, int, int], torch.Tensor], desc: str, progress: bool) -> None:
    """Write every base tensor, block by block, under its output key ``names[tensor]``."""
    total = sum(t.numel for t in catalog.tensors)
    with tqdm(total=total, desc=desc, unit="param", unit_scale=True, disable=not progress, leave=False) as bar:
        for t in catalog.tensors:
            for chunk in tensor_chunks(t):
                block = block_fn(t, chunk.row_start, chunk.row_stop).to(dtype)
                writer.write(names[t.name], chunk.row_start, _as_rows(block, t, chunk.rows))
                bar.update(chunk.numel)


def _as_rows(block: torch.Tensor, t: TensorRecord, rows: int) -> torch.Tensor:
    """A (rows, cols) block in the tensor's own shape (1-D tensors are a single row)."""
    if len(t.shape) <= 1:
        return block.reshape(t.shape)
    return block.reshape([rows] + list(t.shape[1:]))


# -- one model ------------------------------------------------------------------------------------


def export_model(url: str, model_id: str, out: str | Path, *, version: int | None = None, original: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, progress: bool = True) -> Path:
    store = Store.open(url)
    catalog = store.catalog()
    model = catalog.model(model_id)
    dtype = layout.torch_dtype(model.dtype)
    keymap = read_keymap(store, model_id)
    tensors = catalog.tensor_map()
    store_weights = StoreWeights(store, catalog)

    if original:
        def block_fn(t, a, b):
            return store_weights.original(t.name, model_id, (a, b))
    else:
        weights = VersionWeights(store, version, catalog)
        weights.model_index(model_id)  # refuses a model the version does not hold

        def block_fn(t, a, b):
            return weights.theta_hat(t.name, model_id, (a, b))

    entries = []
    for name, source in keymap.items():
        t = tensors[name]
        shape = list(t.shape)
        if t.vocab_rows and model.extra_rows:
            shape[0] += model.extra_rows
        entries.append((source, tuple(shape), dtype))
    with _staged_output(out, overwrite) as tmp, tempfile.TemporaryDirectory() as scratch:
        component = store_weights.fetch_component_weights(model_id, scratch)
        component_entries = _safetensors_entries(component) if component else []
        with SafetensorsWriter(tmp, entries + component_entries, max_shard_bytes=max_shard_bytes) as writer:
            _stream_llm(store, catalog, writer, keymap, dtype, block_fn, f"export {model_id}", progress)
            for t in catalog.tensors:
                extra = store_weights.extra_rows(t.name, model_id)
                if extra is not None:
                    writer.write(keymap[t.name], t.rows, extra)
            if component:
                with CheckpointReader(component.parent) as src:  # the one safetensors reader
                    for key, _, _ in component_entries:
                        writer.write(key, 0, src.read(key))
        store_weights.fetch_files(model_id, tmp, weights=False)
    return Path(out)


def _safetensors_entries(path: Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(key, shape, dtype) of a safetensors file in file order, from its (validated) header."""
    header = read_header(path)
    ordered = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [(k, tuple(v["shape"]), SAFETENSORS_DTYPES[v["dtype"]]) for k, v in ordered]


# -- merged and text weights -------------------------------------------------------------------


def _export_llama(store: Store, catalog: Catalog, out, block_fn, desc, max_shard_bytes, overwrite, progress) -> Path:
    dtype = layout.torch_dtype(catalog.store.base_dtype)
    names = {t.name: t.name for t in catalog.tensors}
    entries = [(t.name, tuple(t.shape), dtype) for t in catalog.tensors]
    with _staged_output(out, overwrite) as tmp:
        with SafetensorsWriter(tmp, entries, max_shard_bytes=max_shard_bytes) as writer:
            _stream_llm(store, catalog, writer, names, dtype, block_fn, desc, progress)
        StoreWeights(store, catalog).fetch_files(None, tmp)
    return Path(out)


def export_text(url: str, out: str | Path, *, version: int | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                overwrite: bool = False, progress: bool = True) -> Path:
    store = Store.open(url)
    catalog = store.catalog()
    weights = VersionWeights(store, version, catalog)

    def block_fn(t, a, b):
        return weights.theta_bar(t.name, (a, b))

    return _export_llama(store, catalog, out, block_fn, "export text weights", max_shard_bytes, overwrite, progress)


def export_merged(url: str, out: str | Path, *, version: int | None = None, method: str | None = None,
                  request: MergeRequest | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  overwrite: bool = False, compile: bool = False, progress: bool = True) -> Path:
    """theta* of a version (``method`` None), or a baseline computed now from the stored models."""
    store = Store.open(url)
    catalog = store.catalog()
    if method is None:
        weights = VersionWeights(store, version, catalog)
        ver = weights.record

        def block_fn(t, a, b):
            return weights.theta_star(t.name, (a, b))

        return _export_llama(store, catalog, out, block_fn, f"export merged v{ver.version}", max_shard_bytes,
                             overwrite, progress)
    if method not in BASELINES:
        raise InvalidInputError(f"unknown merge method {method!r}; expected one of {', '.join(BASELINES)}")
    return _export_baseline(store, catalog, out, method, request or MergeRequest(), max_shard_bytes, overwrite,
                            compile, progress)


def _export_baseline(store, catalog, out, method, request: MergeRequest, max_shard_bytes, overwrite, compile, progress):
    """Run the streaming merge in-process and write theta_pre + alpha * tau* as it is produced."""
    if method == "dare":
        settings = dataclasses.replace(request.settings, method="ta", dare_rate=request.settings.dare_rate or 0.5)
    else:
        settings = dataclasses.replace(request.settings, method=method)
    request = dataclasses.replace(request, settings=settings)
    settings, model_ids = resolve_settings(catalog, request)
    use_cache = settings.trims and settings.dare_rate == 0.0
    driver = streaming.MergeDriver(settings, {t.name: t.numel for t in catalog.tensors}, len(model_ids),
                                   cached_high=cached_high_histogram(store, model_ids, settings.scope) if use_cache else None)
    chunks = [c for t in catalog.tensors for c in tensor_chunks(t)]
    dtype = layout.torch_dtype(catalog.store.base_dtype)
    tensors = catalog.tensor_map()
    entries = [(t.name, tuple(t.shape), dtype) for t in catalog.tensors]
    with _staged_output(out, overwrite) as tmp:
        with SafetensorsWriter(tmp, entries, max_shard_bytes=max_shard_bytes) as writer:
            sink = _MergedWeightsSink(store, writer, tensors, settings.alpha, dtype)
            reader = StoreChunkReader(store, model_ids, prefetch=chunks)
            try:
                streaming.run_local(driver, chunks, reader, ChunkKernels(settings, list(model_ids), compile=compile),
                                    sink, progress_factory=_tqdm_factory(progress))
            finally:
                reader.close()
        StoreWeights(store, catalog).fetch_files(None, tmp)
    return Path(out)


class _MergedWeightsSink:
    """A ChunkWriter that turns each tau* chunk into theta* rows of the exported checkpoint."""

    def __init__(self, store, writer, tensors, alpha, dtype):
        self.store, self.writer, self.tensors, self.alpha, self.dtype = store, writer, tensors, alpha, dtype

    def write(self, chunk, tau_star, packed_masks):
        t = self.tensors[chunk.tensor]
        base = self.store.read_rows(f"{layout.BASE_LLM}/{t.name}", chunk.row_start, chunk.row_stop)
        block = reconstruct.merged_weights(base, tau_star, self.alpha).to(self.dtype)
        self.writer.write(t.name, chunk.row_start, _as_rows(block, t, chunk.rows))


def _tqdm_factory(enabled: bool):
    def factory(name: str, total: int):
        bar = tqdm(total=total, desc=name, unit="param", unit_scale=True, disable=not enabled, leave=False)
        return bar.update
    return factory
