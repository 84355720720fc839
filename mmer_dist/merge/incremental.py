"""Adding a model to the served version, or removing one, without redoing what it already knows.

A from-scratch merge of N models reads every model twice: a LowPass (exact top-K thresholds,
elected-sign counts for the majority sign) and the FinalPass (tau*, masks). A version derived
from the served one (same K, scope, merge step, mask rule; the models plus one, or minus one)
knows most of the first:

- each model's trim threshold depends on that model alone (and K, scope): the served version's
  details record them, so only an added model's threshold is found, by a pass over that model
  and the base (``model_thresholds``) — 2 arrays read instead of N + 2;
- the majority sign depends on every model, but it only decides the entries whose trimmed sign
  sum is exactly 0 (with some entry nonzero): the served version's is assumed, and the final pass
  counts the elected signs as it goes, counts those entries, and keeps their values under the
  other sign beside the version. If the counted majority differs and such entries exist, a
  ``ZeroSumPass`` rewrites just them from what was kept, reading no model; if none exists, a
  wrong guess changed nothing (``streaming.FinalPass``, ``MergeDriver.finish``).

So a derived version reads each stored model once (one final pass, whatever the new model does
to the majority) where a re-merge reads it twice, and equals a from-scratch merge of the same
models in the same order bit for bit (tests hold it to that). Per-entry sums and sign counts of
the task vectors (which would make tau* an update by the new model alone) are deliberately not
kept: the masks compare every model's tau_i with the new tau*, so the final pass reads every
model anyway, and those statistics (~14 bytes per parameter, 7 bf16 models' worth) would save no
read (bench/add_bench.py measures both paths).

When nothing is reusable (per-tensor scope, whose thresholds are not recorded; DARE, whose
dropped task vectors change with the model set), it is an ordinary merge of the same models.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass

import torch

from mmer_dist.errors import InvalidInputError
from mmer_dist.formats.checkpoint import CheckpointReader
from mmer_dist.ingest import ingest_model
from mmer_dist.merge.engine import Backend, MergePlan, MergeRequest, cached_high_histogram, merge
from mmer_dist.merge.passes import StoreChunkReader
from mmer_dist.merge.plan import tensor_chunks
from mmer_dist.method import streaming
from mmer_dist.method.kernels import ChunkKernels
from mmer_dist.method.settings import MergeSettings
from mmer_dist.pause_points import pause_point
from mmer_dist.store.catalog import Catalog, VersionRecord
from mmer_dist.store.store import Store, utc_now


@dataclass(frozen=True)
class Derived:
    record: VersionRecord
    reused: bool  # thresholds and majority came from the served version
    seconds: dict  # where the time went


def served_settings(catalog: Catalog, version: int | None = None) -> tuple[VersionRecord, MergeSettings]:
    served = catalog.version(catalog.serving_version() if version is None else version)
    return served, MergeSettings.from_record(served)


def model_thresholds(store: Store, catalog: Catalog, model_id: str, settings: MergeSettings) -> dict[str, int]:
    """The exact trim threshold (float32 bits, per selection group) of one model under
    ``settings``: its ingest-time histogram, then LowPasses over that model and the base only."""
    one = settings.with_lams((1.0,)).validated([model_id])
    sizes = {t.name: t.numel for t in catalog.tensors}
    driver = streaming.MergeDriver(one, sizes, 1, cached_high=cached_high_histogram(store, (model_id,), one.scope))
    chunks = [c for t in catalog.tensors for c in tensor_chunks(t)]
    kernels = ChunkKernels(one, [model_id])
    while not driver.bounds.is_exact():
        request = driver.next_pass()
        reader = StoreChunkReader(store, (model_id,), prefetch=chunks)
        try:
            driver.accept(streaming.run_pass(request, chunks, reader, kernels))
        finally:
            reader.close()
    return {g: int(driver.bounds.upper[g][0]) for g in driver.sizes}


def _float_bits(values: list[float]) -> list[int]:
    return torch.tensor(values, dtype=torch.float32).view(torch.int32).to(torch.int64).tolist()


def known_state(store: Store, served: VersionRecord, catalog: Catalog, plan: MergePlan,
                timings: dict) -> dict | None:
    """The decided state of ``plan`` as far as the served version knows it (see the module doc),
    or None when it cannot be reused."""
    settings = plan.settings
    if settings.dare_rate or settings.with_lams(()) != MergeSettings.from_record(served).with_lams(()):
        return None
    details = json.loads(served.details)
    thresholds, majority = details.get("thresholds"), details.get("majority")
    if not isinstance(thresholds, dict) or not isinstance(majority, dict):
        return None  # per-tensor scope: thresholds are not recorded
    t0 = time.perf_counter()
    bits = {g: {m: b for m, b in zip(served.models, _float_bits(v))} for g, v in thresholds.items()}
    for m in plan.model_ids:
        if m not in served.models:
            for g, b in model_thresholds(store, catalog, m, settings).items():
                bits.setdefault(g, {})[m] = b
    timings["thresholds_of_new_models"] = round(time.perf_counter() - t0, 3)
    if any(set(plan.model_ids) - set(per_model) for per_model in bits.values()):
        return None
    return {"threshold_bits": {g: [per_model[m] for m in plan.model_ids] for g, per_model in bits.items()},
            "majority": {g: float(v) for g, v in majority.items()}}


@dataclass(frozen=True)
class ServedChange:
    """``mmer add`` / ``mmer remove`` of one model: the served version's models plus, or minus, it.

    It is checked twice: first against the served version the command read (``read``: clear
    errors before any work), then, under the merge's writer lock, against the version served at
    that moment. When another command promoted a version in between, the change is applied to
    that one instead (two adds at once both end in the served version, neither undoes the
    other), or refused with a line naming it when it no longer applies there."""

    model_id: str
    adding: bool
    read: int  # the served version the command read before taking the lock

    def models(self, catalog: Catalog, served: VersionRecord) -> tuple[str, ...]:
        """The new version's models, or InvalidInputError saying why the change does not apply."""
        m = self.model_id
        meanwhile = (f", promoted meanwhile by another command (this one read version {self.read}); nothing "
                     "was published" if served.version != self.read else "")
        if self.adding:
            if m in served.models:
                raise InvalidInputError(f"model {m!r} is already in the served version {served.version}{meanwhile}")
            return tuple(served.models) + (m,)
        if not catalog.has_model(m):
            raise InvalidInputError(f"no model {m!r} in the store (models: {', '.join(x.id for x in catalog.models)})")
        if m not in served.models:
            gone = catalog.model(m).removed_at
            raise InvalidInputError(f"model {m!r} is not in the served version {served.version} (models: "
                                    f"{', '.join(served.models)})" + (f"; it was removed at {gone}" if gone else "")
                                    + meanwhile)
        if len(served.models) == 1:
            raise InvalidInputError(f"model {m!r} is the only model of the served version {served.version}; a "
                                    f"version needs at least one{meanwhile}")
        return tuple(x for x in served.models if x != m)

    def amend(self, catalog: Catalog) -> Catalog:
        """The model's record as the change leaves it, committed with the version: marked removed
        (kept for the versions that hold it, then gc), or, added again, no longer removed."""
        at = None if self.adding else utc_now()
        return catalog.replace(models=tuple(dataclasses.replace(r, removed_at=at) if r.id == self.model_id else r
                                            for r in catalog.models))


class _Derivation:
    """The callbacks ``merge`` calls under the writer lock to derive a version from the served one."""

    def __init__(self, store: Store, change: ServedChange, lam: dict[str, float]):
        self.store, self.change, self.lam = store, change, lam
        self.served: VersionRecord | None = None
        self.reused = False
        self.timings: dict = {}

    def request(self, catalog: Catalog) -> MergeRequest:
        served, settings = served_settings(catalog)
        model_ids = self.change.models(catalog, served)
        if served.version != self.change.read:
            print(f"note: version {served.version} was promoted meanwhile (this command read version "
                  f"{self.change.read}); the new version is derived from it: {', '.join(model_ids)}", file=sys.stderr)
        self.served = served
        lams = {m: served.lams[served.models.index(m)] for m in model_ids if m in served.models}
        return MergeRequest(settings, {**lams, **self.lam}, model_ids)

    def known(self, catalog: Catalog, plan: MergePlan) -> dict | None:
        state = known_state(self.store, self.served, catalog, plan, self.timings)
        self.reused = state is not None
        return state


def derive_version(url: str, change: ServedChange, backend: Backend, *, lam: dict[str, float] | None = None,
                   promote: bool = True, workers: int = 1, compile: bool = False, device: str = "cpu",
                   progress: bool = True) -> Derived:
    """A version over the served version's models with ``change`` applied, with the served
    version's settings, reusing what it knows; decided under the writer lock (``ServedChange``)."""
    derivation = _Derivation(Store.open(url), change, dict(lam or {}))
    t0 = time.perf_counter()
    record = merge(url, derivation.request, backend, workers=workers, compile=compile, device=device,
                   progress=progress, promote=promote, known=derivation.known, amend=change.amend)
    derivation.timings["merge"] = round(time.perf_counter() - t0, 3)
    return Derived(record, derivation.reused, derivation.timings)


def add_model(url: str, model_id: str, path: str, modality: str, backend: Backend, *, fmt: str | None = None,
              mapping_file: str | None = None, lam: float = 1.0, task: str | None = None, promote: bool = True,
              workers: int = 1, compile: bool = False, device: str = "cpu", progress: bool = True) -> Derived:
    """``mmer add``: ingest, then a version over the served version's models plus this one."""
    store = Store.open(url)
    catalog = store.catalog()
    if not catalog.versions:
        raise InvalidInputError("the store has no version to add to yet; run `mmer merge` first (or ingest "
                                "the model and merge)")
    served, _ = served_settings(catalog)
    change = ServedChange(model_id, adding=True, read=served.version)
    change.models(catalog, served)  # refused now, before the ingest, if it is already served
    t0 = time.perf_counter()
    if catalog.has_model(model_id):
        # an earlier `mmer add` of this very checkpoint that ingested it and was then interrupted:
        # carry on with the merge; any other model of that id is a mistake
        if catalog.model(model_id).sha256 != CheckpointReader(path).sha256():
            raise InvalidInputError(f"model id {model_id!r} is already in the store, from another checkpoint; "
                                    "pick another id")
        if progress:
            print(f"{model_id!r} was ingested by an earlier, interrupted add: merging it")
    else:
        ingest_model(url, model_id, path, modality, fmt=fmt, mapping_file=mapping_file, lam=lam, task=task,
                     progress=progress)
    ingest_s = time.perf_counter() - t0
    pause_point("add-ingested")
    derived = derive_version(url, change, backend, lam={model_id: lam}, promote=promote, workers=workers,
                             compile=compile, device=device, progress=progress)
    derived.seconds["ingest"] = round(ingest_s, 3)
    return derived


def remove_model(url: str, model_id: str, backend: Backend, *, promote: bool = True, workers: int = 1,
                 compile: bool = False, device: str = "cpu", progress: bool = True) -> Derived:
    """``mmer remove``: a version over the served version's models without this one, and the
    model marked removed, in one catalog commit. The model's data stays (earlier versions hold
    it; ``mmer gc --keep K`` removes it once none does)."""
    catalog = Store.open(url).catalog()
    served, _ = served_settings(catalog)
    change = ServedChange(model_id, adding=False, read=served.version)
    change.models(catalog, served)  # unknown, not served, or the last one: refused before any work
    pause_point("remove-read")
    return derive_version(url, change, backend, promote=promote, workers=workers, compile=compile, device=device,
                          progress=progress)
