"""A published version's weights, read straight from the store: the one reconstruction path.

``VersionWeights`` binds one store to one immutable version and yields, for any LLM tensor or
row block of it, the weights MMER defines (DESIGN.md, "The method, exactly"), in float32:

    base(name)            theta_pre
    theta_hat(name, i)    theta_pre + m_i * tau*              (retention, model i)
    theta_bar(name)       theta_pre + mean_i(m_i) * tau*      (text tokens, expansion)
    theta_mean(name, S)   theta_pre + mean_{i in S}(m_i) * tau*   (a subset's mean mask)
    theta_star(name)      theta_pre + alpha * tau*            (the merged model)
    original(name, i)     theta_i as ingested (no version involved)

Export writes these to disk and the serving engine puts them on a device; both call the same
functions of ``mmer_dist.method.reconstruct`` on the same float32 inputs, so a served theta_hat_i
cast to the serving dtype is bit-identical to ``mmer export`` of model i. ``layers(a, b)`` names
the tensors a pipeline stage owning decoder layers [a, b) needs (embeddings with the first layer,
final norm and LM head after the last), so a stage reads only its share of the store.

Each model's extra vocabulary rows (beyond the base's) are model-specific, never merged:
``extra_rows(name, i)`` reads them. The token-id space that puts every model's extra rows after
the base vocabulary is ``VocabularyLayout``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from mmer_dist.errors import InvalidInputError
from mmer_dist.method import reconstruct
from mmer_dist.method.masks import unpack_bits
from mmer_dist.store import layout
from mmer_dist.store.catalog import Catalog, TensorRecord, VersionRecord
from mmer_dist.store.files import copy_file, copy_files, safe_join  # noqa: F401  (safe_join re-exported)
from mmer_dist.store.store import Store
from mmer_dist.store.weightsets import WeightSet

Rows = tuple[int, int] | None  # a row block [start, stop) of the tensor's 2-D view; None = all rows


@dataclass(frozen=True)
class VocabularyLayout:
    """One token-id space for the base vocabulary and every model's extra rows.

    Ids [0, base) are the base vocabulary, the same token in every model. Model k's extra rows
    (``extra[k]`` of them, in the version's model order) follow at ids
    [base + offset_k, base + offset_k + extra_k), offset_k = sum of the extra rows of the models
    before k. A model's own tokenizer numbers its extra tokens base, base + 1, ...: ``to_global``
    and ``to_local`` translate between that and this space.
    """

    base: int
    models: tuple[str, ...]
    extra: tuple[int, ...]

    @cached_property
    def offsets(self) -> dict[str, int]:
        out, acc = {}, 0
        for m, n in zip(self.models, self.extra):
            out[m] = acc
            acc += n
        return out

    @property
    def size(self) -> int:
        return self.base + sum(self.extra)

    def extra_of(self, model_id: str) -> int:
        return self.extra[self.models.index(model_id)]

    def to_global(self, model_id: str | None, local: torch.Tensor) -> torch.Tensor:
        """Ids of ``model_id``'s tokenizer (or the base's, None) in the global space."""
        local = torch.as_tensor(local, dtype=torch.int64)
        limit = self.base + (self.extra_of(model_id) if model_id is not None else 0)
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= limit):
            bad = local[(local < 0) | (local >= limit)][:5].tolist()
            who = f"model {model_id!r}" if model_id else "the base"
            raise InvalidInputError(f"token ids {bad} are outside the vocabulary of {who} ({limit} tokens)")
        if model_id is None:
            return local
        return torch.where(local >= self.base, local + self.offsets[model_id], local)

    def to_local(self, model_id: str | None, global_ids: torch.Tensor) -> torch.Tensor:
        global_ids = torch.as_tensor(global_ids, dtype=torch.int64)
        if model_id is None:
            return global_ids
        return torch.where(global_ids >= self.base, global_ids - self.offsets[model_id], global_ids)

    def owner(self, global_id: int) -> str | None:
        """The model whose extra row ``global_id`` is (None for the base vocabulary)."""
        if global_id < self.base:
            return None
        for m, n in zip(self.models, self.extra):
            start = self.base + self.offsets[m]
            if start <= global_id < start + n:
                return m
        raise InvalidInputError(f"token id {global_id} is outside the vocabulary ({self.size} tokens)")


class StoreWeights:
    """What a store holds independently of any version: theta_pre, each model's ingested theta_i
    and extra vocabulary rows."""

    def __init__(self, store: Store, catalog: Catalog | None = None):
        self.store = store
        self.catalog = catalog if catalog is not None else store.catalog()
        self.tensors: dict[str, TensorRecord] = self.catalog.tensor_map()

    @cached_property
    def base_config(self) -> dict:
        return json.loads(self.catalog.store.base_config)

    @property
    def dtype(self) -> torch.dtype:
        """The base's dtype: what weights are served and exported in by default."""
        return layout.torch_dtype(self.catalog.store.base_dtype)

    def _record(self, name: str) -> TensorRecord:
        if name not in self.tensors:
            raise InvalidInputError(f"no LLM tensor {name!r} in the store")
        return self.tensors[name]

    def _rows(self, name: str, rows: Rows) -> tuple[int, int]:
        t = self._record(name)
        a, b = rows if rows is not None else (0, t.rows)
        if not 0 <= a <= b <= t.rows:
            raise InvalidInputError(f"rows [{a}, {b}) are outside tensor {name!r} ({t.rows} rows)")
        return a, b

    def base(self, name: str, rows: Rows = None) -> torch.Tensor:
        """theta_pre in the stored dtype, as (rows, cols)."""
        a, b = self._rows(name, rows)
        return self.store.read_rows(f"{layout.BASE_LLM}/{name}", a, b)

    def original(self, name: str, model_id: str, rows: Rows = None) -> torch.Tensor:
        """theta_i as ingested, in its stored dtype (bit for bit)."""
        a, b = self._rows(name, rows)
        self.catalog.model(model_id)
        return self.store.read_rows(f"{layout.model_llm(model_id)}/{name}", a, b)

    def extra_rows(self, name: str, model_id: str) -> torch.Tensor | None:
        """Model ``model_id``'s rows of vocabulary tensor ``name`` beyond the base's, or None."""
        n = self.catalog.model(model_id).extra_rows
        if not n or not self._record(name).vocab_rows:
            return None
        return self.store.read_rows(f"{layout.model_extra(model_id)}/{name}", 0, n)

    def as_shape(self, name: str, block: torch.Tensor) -> torch.Tensor:
        """A whole tensor's (rows, cols) block in the tensor's own shape."""
        return block.reshape(self._record(name).shape)

    # -- files: the base's, and each model's modality component -----------------------------------

    def fetch_files(self, model_id: str | None, dest: str | Path, *, weights: bool = True) -> Path:
        """Copy the base's files (``model_id`` None) or model ``model_id``'s component (its encoder
        + connector weights as ``component.safetensors`` when ``weights``, and its configs,
        tokenizer, processor and chat template) into the local directory ``dest``: a checkpoint
        folder without the LLM weights, which transformers' ``from_pretrained`` of a tokenizer or
        processor reads. Names read from the store never leave ``dest``."""
        dest = Path(dest)
        if model_id is None:
            prefix, weights_path = layout.BASE_FILES, None
        else:
            self.catalog.model(model_id)
            prefix = f"{layout.model_component(model_id)}/files"
            weights_path = f"{layout.model_component(model_id)}/{layout.COMPONENT_WEIGHTS}"
        dest.mkdir(parents=True, exist_ok=True)
        copy_files(self.store, prefix, dest)  # names never leave dest; bytes checked against the manifest
        if weights and weights_path is not None and self.store.exists_path(weights_path):
            copy_file(self.store, weights_path, dest / layout.COMPONENT_WEIGHTS)
        return dest

    def fetch_component_weights(self, model_id: str, dest: str | Path) -> Path | None:
        """Model ``model_id``'s encoder + connector tensors as a local safetensors file in ``dest``
        (the store may be remote), or None when it has no component weights."""
        path = f"{layout.model_component(model_id)}/{layout.COMPONENT_WEIGHTS}"
        if not self.store.exists_path(path):
            return None
        local = Path(dest) / layout.COMPONENT_WEIGHTS
        copy_file(self.store, path, local)
        return local


class VersionWeights(StoreWeights):
    """Reads one published version of a store (see the module docstring)."""

    def __init__(self, store: Store, version: int | None = None, catalog: Catalog | None = None):
        super().__init__(store, catalog)
        self.record: VersionRecord = self.catalog.version(version)

    @classmethod
    def open(cls, url: str, version: int | None = None) -> VersionWeights:
        return cls(Store.open(url), version)

    # -- what the version holds ----------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.record.version

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.record.models)

    @cached_property
    def vocabulary(self) -> VocabularyLayout:
        return VocabularyLayout(int(self.base_config["vocab_size"]), self.models,
                                tuple(self.catalog.model(m).extra_rows for m in self.models))

    def model_index(self, model_id: str) -> int:
        if model_id not in self.record.models:
            raise InvalidInputError(f"model {model_id!r} is not part of version {self.version} "
                                    f"(models: {', '.join(self.models)})")
        return self.record.models.index(model_id)

    def layers(self, first: int, stop: int, *, embeddings: bool | None = None,
               head: bool | None = None) -> list[TensorRecord]:
        """The tensors of decoder layers [first, stop), plus the embeddings when the range starts
        at layer 0 and the final norm and LM head when it ends at the last layer (overridable)."""
        n_layers = int(self.base_config["num_hidden_layers"])
        if not 0 <= first < stop <= n_layers:
            raise InvalidInputError(f"layer range [{first}, {stop}) is not within the model's {n_layers} layers")
        embeddings = first == 0 if embeddings is None else embeddings
        head = stop == n_layers if head is None else head
        keep = [t for t in self.tensors.values()
                if first <= t.layer < stop or (embeddings and t.layer < 0) or (head and t.layer >= n_layers)]
        return sorted(keep, key=lambda t: (t.layer, t.name))

    # -- the version's arrays --------------------------------------------------------------------

    def tau_star(self, name: str, rows: Rows = None) -> torch.Tensor:
        a, b = self._rows(name, rows)
        return self.store.read_rows(f"{layout.version_tau_star(self.version)}/{name}", a, b)

    def packed_masks(self, name: str, rows: Rows = None, model_id: str | None = None) -> torch.Tensor:
        """Bit-packed masks, (N, rows, ceil(cols/8)) uint8, or (rows, ...) of one model."""
        a, b = self._rows(name, rows)
        path = f"{layout.version_masks(self.version)}/{name}"
        if model_id is None:
            return self.store.read(path, slice(None), slice(a, b))
        return self.store.read(path, self.model_index(model_id), slice(a, b))

    def mask(self, name: str, model_id: str, rows: Rows = None) -> torch.Tensor:
        return unpack_bits(self.packed_masks(name, rows, model_id), self._record(name).cols)

    def mask_count(self, name: str, rows: Rows = None, models: Sequence[str] | None = None) -> torch.Tensor:
        """Per entry, how many of ``models`` (default: all of the version's) have their mask set."""
        packed = self.packed_masks(name, rows)
        if models is not None:
            packed = packed[[self.model_index(m) for m in models]]
        return unpack_bits(packed, self._record(name).cols).sum(0, dtype=torch.int32)

    # -- reconstructed weights (float32, (rows, cols)) ------------------------------------------

    def weight_set(self, key: WeightSet, name: str, rows: Rows = None) -> torch.Tensor:
        """Tensor ``name`` (or a row block) of weight set ``key``, in float32."""
        if key.kind == "base":
            return self.base(name, rows).float()
        return compose(key, self.base(name, rows), self.tau_star(name, rows), self.packed_masks(name, rows),
                       self._record(name).cols, self.model_index, self.record.alpha)

    def theta_hat(self, name: str, model_id: str, rows: Rows = None) -> torch.Tensor:
        return self.weight_set(WeightSet.hat(model_id), name, rows)

    def theta_bar(self, name: str, rows: Rows = None) -> torch.Tensor:
        return self.weight_set(WeightSet.bar(), name, rows)

    def theta_mean(self, name: str, models: Sequence[str], rows: Rows = None) -> torch.Tensor:
        return self.weight_set(WeightSet.mean(models), name, rows)

    def theta_star(self, name: str, rows: Rows = None) -> torch.Tensor:
        return self.weight_set(WeightSet.star(), name, rows)


def compose(key: WeightSet, base: torch.Tensor, tau_star: torch.Tensor, packed: torch.Tensor, cols: int,
            model_index, alpha: float) -> torch.Tensor:
    """Weight set ``key`` from theta_pre, tau* and the (N, rows, ceil(cols/8)) packed masks of a
    block, in float32: the one place where served and exported weights are formed (the serving
    engine calls it on device-resident blocks, ``VersionWeights`` on blocks read from the store).
    ``model_index`` maps a model id to its row of ``packed``."""
    if key.kind == "base":
        return base.float()
    if key.kind == "star":
        return reconstruct.merged_weights(base, tau_star, alpha)
    if key.kind == "hat":
        return reconstruct.reconstruct(base, unpack_bits(packed[model_index(key.models[0])], cols), tau_star)
    # bar (every model of the version) or mean over a subset; all rows at once is the common case
    n = packed.shape[0] if key.kind == "bar" else len(key.models)
    if key.kind == "mean":
        packed = packed[[model_index(m) for m in key.models]]
    count = unpack_bits(packed, cols).sum(0, dtype=torch.int32)
    return reconstruct.text_weights(base, count, n, tau_star)
