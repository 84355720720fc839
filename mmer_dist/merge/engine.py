"""A merge of the store's models into a new version, on any backend.

The engine resolves settings from the catalog (models, lambda), plans shards, stages the version
(resuming a matching interrupted run), drives the passes through a backend, and publishes. The
backend only decides where ``passes.run_shard_pass`` executes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

from mmer_dist.errors import InvalidInputError
from mmer_dist.method import select, streaming
from mmer_dist.method.neuro import check_neuron_rank
from mmer_dist.method.settings import MergeSettings
from mmer_dist.method.trim import selection_group
from mmer_dist.merge.kernel_cache import default_cache_dir
from mmer_dist.merge.passes import MergeJob, final_stats_from_record
from mmer_dist.merge.plan import ShardSpec, plan_shards
from mmer_dist.merge.progress import progress_bar
from mmer_dist.pause_points import pause_point
from mmer_dist.store import layout
from mmer_dist.store.catalog import Catalog, VersionRecord, details_json
from mmer_dist.ingest import read_histograms
from mmer_dist.store.store import ArraySpec, Store, utc_now
from mmer_dist.store.versions import Staging, fingerprint, publish_version


@dataclass(frozen=True)
class MergeRequest:
    """What the user asks for: the settings (their ``lams`` filled in from the catalog), lambda
    overrides per model, and which models (default: all, in catalog order)."""

    settings: MergeSettings = field(default_factory=MergeSettings)
    lam: dict[str, float] = field(default_factory=dict)
    models: tuple[str, ...] | None = None

    @classmethod
    def of(cls, *, lam: dict[str, float] | None = None, models=None, **settings) -> MergeRequest:
        """A request from settings fields given as keywords (``MergeRequest.of(method="ta")``)."""
        return cls(MergeSettings(**settings), dict(lam or {}), tuple(models) if models else None)


class Backend(Protocol):
    name: str

    def start(self, job: MergeJob, shards: list[ShardSpec]) -> None: ...

    def run_pass(self, request: streaming.PassRequest, shards: list[ShardSpec],
                 progress: Callable[[int], None]) -> list[tuple[object, float]]: ...

    def stop(self) -> None: ...


def resolve_settings(catalog: Catalog, request: MergeRequest) -> tuple[MergeSettings, tuple[str, ...]]:
    known = [m.id for m in catalog.models]
    model_ids = tuple(request.models) if request.models else tuple(known)
    repeated = sorted({m for m in model_ids if model_ids.count(m) > 1})
    if repeated:
        raise InvalidInputError(f"--models names {', '.join(map(repr, repeated))} more than once; "
                                "each model can be merged once")
    for m in model_ids:
        catalog.model(m)  # raises naming the unknown id
    if not model_ids:
        raise InvalidInputError("the store has no models to merge; ingest some with `mmer ingest --model`")
    for m in request.lam:
        if m not in model_ids:
            raise InvalidInputError(f"--lam names model {m!r}, which is not in this merge ({', '.join(model_ids)})")
    lams = tuple(float(request.lam.get(m, catalog.model(m).lam)) for m in model_ids)
    settings = request.settings.with_lams(lams).validated(list(model_ids))
    if settings.method == "neuro":
        for t in catalog.tensors:
            check_neuron_rank(t.name, len(t.shape))
    return settings, model_ids


def cached_high_histogram(store: Store, model_ids, scope: str) -> select.GroupHistogram:
    """The ingest-time high-digit histograms, grouped by selection group, models stacked."""
    per_model = []
    for m in model_ids:
        groups: dict[str, list[select.SparseCounts]] = {}
        for tensor, counts in read_histograms(store, m).items():
            groups.setdefault(selection_group(tensor, scope), []).append(counts)
        per_model.append({g: select.SparseCounts.sum(parts) for g, parts in groups.items()})
    return select.GroupHistogram({g: select.SparseCounts.stack([pm[g] for pm in per_model], dim=1)
                                  for g in per_model[0]})


def create_version_arrays(store: Store, catalog: Catalog, model_ids, version: int) -> None:
    """All of the version's arrays, empty; workers then only write chunks (one writer each)."""
    store.create_arrays([spec for t in catalog.tensors for spec in (
        ArraySpec(f"{layout.version_tau_star(version)}/{t.name}", t.rows, t.cols, t.rows_per_chunk, "float32"),
        ArraySpec(f"{layout.version_masks(version)}/{t.name}", t.rows, layout.packed_cols(t.cols), t.rows_per_chunk,
                  "uint8", compress=True, lead=len(model_ids)))])


@dataclass(frozen=True)
class MergePlan:
    """What this merge will compute and how it is split; the fingerprint identifies the run."""

    settings: MergeSettings
    model_ids: tuple[str, ...]
    shards: list[ShardSpec]
    version: int
    fingerprint: str


def plan_merge(catalog: Catalog, request: MergeRequest, workers: int) -> MergePlan:
    if catalog.store is None:
        raise InvalidInputError("the store has no base model yet")
    settings, model_ids = resolve_settings(catalog, request)
    n_layers = json.loads(catalog.store.base_config)["num_hidden_layers"]
    shards = plan_shards(catalog.tensors, n_layers, workers)
    latest = catalog.latest_version()
    version = (latest.version + 1) if latest else 1
    fp = fingerprint(settings=asdict(settings), models=[(m, catalog.model(m).sha256) for m in model_ids],
                     base=catalog.store.base_sha256, grid=[(t.name, t.rows_per_chunk) for t in catalog.tensors],
                     shards=[s.tensors for s in shards], version=version)
    return MergePlan(settings, model_ids, shards, version, fp)


def drive_passes(driver: streaming.MergeDriver, backend: Backend, plan: MergePlan, staging: Staging,
                 progress: bool) -> dict:
    """Run passes until the driver is done; returns per-pass and per-shard seconds. Shards whose
    final pass completed in an earlier, interrupted run are not redone."""
    pass_seconds, shard_seconds = {}, {}
    state = staging.load_state()
    while (req := driver.next_pass()) is not None:
        name = type(req).__name__
        done = staging.done_shards() if req.writes else {}  # finished shards of an earlier run
        todo = [s for s in plan.shards if s.index not in done]
        t0 = time.perf_counter()
        with progress_bar(f"{name} ({len(todo)} shards)", sum(s.numel for s in todo), progress) as update:
            results = backend.run_pass(req, todo, update)
        pass_seconds[name] = round(time.perf_counter() - t0, 3)
        shard_seconds[name] = {s.index: round(sec, 3) for s, (_, sec) in zip(todo, results)}
        partials = [r for r, _ in results] + [final_stats_from_record(d) for d in done.values()]
        driver.accept(streaming.merge_results(partials))
        decided = driver.decided_state()
        if decided is not None and state is None:  # a resumed run can skip to the final pass
            staging.save_state(decided)
            state = decided
    return {"pass_seconds": pass_seconds, "shard_seconds": shard_seconds}


def merge(url: str, request: MergeRequest | Callable[[Catalog], MergeRequest], backend: Backend, *,
          workers: int = 1, compile: bool = False, device: str = "cpu", progress: bool = True, promote: bool = True,
          known: Callable[[Catalog, MergePlan], dict | None] | None = None,
          amend: Callable[[Catalog], Catalog] | None = None) -> VersionRecord:
    """Merge the store's models into a new published version; returns its catalog record.

    ``promote`` makes it the served version in the same commit. ``request`` may be a function of
    the catalog as read under the writer lock (``mmer add`` / ``remove`` derive their models from
    the version served then, never from one read before). ``known(catalog, plan)`` may give
    a decided state (threshold bits and majority signs, ``MergeDriver.decided_state``'s form) to
    start from: the thresholds must be exact, the majority signs are checked during the final
    pass (and the entries they decided rewritten if they were wrong, ``streaming.ZeroSumPass``),
    so the result is the same as counting them. ``amend(catalog)`` changes the catalog in the
    version's own commit (``mmer remove`` marks its model removed there: one commit, so a kill
    leaves both undone or both done)."""
    started = time.time()
    store = Store.open(url)
    # The catalog is read under the writer lock: read before it, a version published meanwhile
    # would get the same number and Staging.open would delete its arrays.
    with store.writer_lock():
        catalog = store.catalog()
        if callable(request):
            request = request(catalog)
        plan = plan_merge(catalog, request, workers)
        pause_point("merge-locked")
        staging = Staging.open(store, plan.version, plan.fingerprint)
        if not staging.resumed:
            create_version_arrays(store, catalog, plan.model_ids, plan.version)
            staging.mark_arrays_ready()
        pause_point("merge-staged")
        settings = plan.settings
        use_cache = settings.trims and settings.dare_rate == 0.0
        driver = streaming.MergeDriver(
            settings, {t.name: t.numel for t in catalog.tensors}, len(plan.model_ids),
            cached_high=cached_high_histogram(store, plan.model_ids, settings.scope) if use_cache else None)
        if (state := staging.load_state()) is not None:
            driver.restore(state)
        elif known is not None and (given := known(catalog, plan)) is not None:
            driver.restore(given)
            driver.check_majority = True
        try:
            backend.start(MergeJob(url, plan.model_ids, settings, plan.version, plan.fingerprint, compile=compile,
                                   device=device, kernel_cache=default_cache_dir()), plan.shards)
            try:
                timings = drive_passes(driver, backend, plan, staging, progress)
            finally:
                backend.stop()
            record = version_record(catalog, plan, driver, backend.name, timings, staging.resumed,
                                    time.time() - started)
            pause_point("merge-computed")
            # fails if another writer committed since (object stores)
            publish_version(store, record, amend(catalog) if amend else catalog, promote=promote)
        except BaseException:
            staging.abandon()  # an error or Ctrl-C leaves no staging behind (a SIGKILL leaves it to resume)
            raise
        pause_point("merge-published")
        staging.discard()
    return record


def version_record(catalog: Catalog, plan: MergePlan, driver: streaming.MergeDriver, backend: str, timings: dict,
                   resumed: bool, seconds: float) -> VersionRecord:
    settings, stats = plan.settings, driver.stats
    params = sum(t.numel for t in catalog.tensors)
    global_scope = settings.scope == "global"
    details = dict(
        thresholds={g: v.tolist() for g, v in driver.thresholds().items()} if global_scope else "per-tensor",
        majority=driver.majority if global_scope else _majority_summary(driver.majority),
        resumed=resumed, shards=[s.describe() for s in plan.shards],
        decided_by_majority=stats.decided.per_group() if global_scope else sum(stats.decided.per_group().values()),
        majority_rewritten=driver.rewritten_entries, **timings)
    return VersionRecord(
        version=plan.version, created_at=utc_now(), **settings.record(), models=list(plan.model_ids),
        mask_density=[int(c) / params for c in stats.mask_counts],
        tau_star_density=stats.nonzero / max(1, stats.entries), backend=backend,
        passes=list(driver.passes_run), seconds=round(seconds, 3), details=details_json(**details))


def _majority_summary(majority: dict[str, float]) -> dict[str, int]:
    values = list(majority.values())
    return {"positive_groups": sum(1 for v in values if v > 0), "negative_groups": sum(1 for v in values if v < 0)}

