"""Lambda calibration: each model's mask lambda picked from a grid by a validation hook, recorded.

MMER's mask keeps an entry of model i where sign(tau_i) = sign(tau*) and |tau_i| >= lam_i * 0.5 * |tau*|;
the paper tunes lam_i per modality on validation accuracy. ``calibrate`` does that over a store:

1. For each lam in the grid it merges one version with every calibrated model at that lam; the
   method, K, scope, alpha, mask rule, DARE and NeuroMerging settings, the models and the other
   models' lams are those of the base version (the latest, or the one named). lam enters the
   masks only, and m_i depends on lam_i alone, so one version per grid value serves every model;
   a grid value the base version already has for every calibrated model reuses the base version.
2. Per model and lam, data-free statistics: the mask density |m_i| / d (the version's record) and
   the reconstruction error ||m_i o tau* - tau_i||_1 / ||tau_i||_1 with tau_i = theta_i - theta_pre
   untrimmed on the shared LLM rows, streamed from the store one row block at a time
   (``reconstruction_error``; its test compares it with whole-tensor sums over the checkpoints).
3. The user's hook scores each (model, lam): ``fn(model_id: str, store: str, version: int) -> float``,
   higher is better: the model id, the store URL and the version to read theta_hat_i from (e.g.
   ``VersionWeights.open(store, version).theta_hat(name, model_id)``, or export it). It is named as
   ``module:function`` (``load_hook``); the current directory is importable. The kit's own
   models have ``mmer_dist.demo.calibration:kit_accuracy``.
4. Best lam per model: the highest score; ties go to the lam closest to 1 (the paper's default),
   then to the smaller reconstruction error.
5. The choice is written to ``calibration.json`` at the store's root (``layout.CALIBRATION``), under
   the writer lock and atomically; ``mmer merge --lam auto`` reads it (``calibrated_lams``).

The versions merged for calibration are published without being promoted (never served). They
hold a tau* and masks each, a full model's worth of bytes, so they are removed again whatever
happens (only those this run published, checked under the writer lock) unless ``keep_versions``
(then ``mmer promote --version V`` can serve one, ``mmer gc --keep K`` retires them).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from mmer_dist.errors import InvalidInputError, StoreError
from mmer_dist.method.masks import unpack_bits
from mmer_dist.store import layout
from mmer_dist.store.atomic import atomic_put
from mmer_dist.store.catalog import Catalog, VersionRecord
from mmer_dist.store.store import Store, utc_now
from mmer_dist.store.weights import StoreWeights, VersionWeights

GRID = (0.3, 0.5, 0.7, 0.9, 1.0, 1.2, 1.5)  # lam * 50%: 15% .. 75%, the paper's Fig. 4b range
FORMAT = 1  # of calibration.json
Hook = Callable[[str, str, int], float]


# -- inputs --------------------------------------------------------------------------------------


def load_hook(spec: str) -> Hook:
    """``module:function`` -> the function; every problem one clear InvalidInputError."""
    module_name, sep, attr = (spec or "").partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInputError(f"--eval {spec!r}: expected module:function (e.g. mypackage.evals:accuracy)")
    if os.getcwd() not in sys.path:  # like `python -m`: a module beside the user is importable
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidInputError(f"--eval {spec!r}: cannot import module {module_name!r} ({e})") from None
    except Exception as e:  # the module itself failed while importing
        raise InvalidInputError(f"--eval {spec!r}: importing {module_name!r} failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise InvalidInputError(f"--eval {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise InvalidInputError(f"--eval {spec!r}: {attr!r} is not a function")
    return fn


def parse_grid(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidInputError(f"--grid {text!r}: expected comma-separated numbers, e.g. 0.5,0.7,0.9,1.0") from None
    return check_grid(values)


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(float(x) for x in grid)
    if not grid:
        raise InvalidInputError("the lambda grid is empty")
    if bad := [x for x in grid if not (math.isfinite(x) and x >= 0.0)]:
        raise InvalidInputError(f"lambda grid values must be finite numbers >= 0, got {bad}")
    if len(set(grid)) != len(grid):
        raise InvalidInputError(f"the lambda grid repeats a value: {list(grid)}")
    return tuple(sorted(grid))


# -- the result ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LamResult:
    lam: float
    version: int  # the version scored (a calibration version, removed afterwards unless kept; or the base)
    density: float  # |m_i| / d
    rel_l1: float  # ||m_i o tau* - tau_i||_1 / ||tau_i||_1
    score: float  # the hook's


@dataclass(frozen=True)
class ModelCalibration:
    model_id: str
    sha256: str  # the ingested model the lam was chosen for
    results: tuple[LamResult, ...]

    @property
    def best(self) -> LamResult:
        return min(self.results, key=lambda r: (-r.score, abs(r.lam - 1.0), r.rel_l1, r.lam))


@dataclass(frozen=True)
class Calibration:
    base_version: int
    settings: dict  # merge settings of the base version (what each lam's merge used)
    hook: str
    grid: tuple[float, ...]
    models: dict[str, ModelCalibration]
    created_at: str = field(default_factory=utc_now)
    seconds: dict = field(default_factory=dict)
    kept_versions: bool = False

    @property
    def lams(self) -> dict[str, float]:
        return {m: c.best.lam for m, c in self.models.items()}

    def to_json(self) -> str:
        doc = {"format": FORMAT, **asdict(self), "lams": self.lams}
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise StoreError(f"{layout.CALIBRATION}: format {doc.get('format')!r}, this version reads {FORMAT}")
        models = {m: ModelCalibration(c["model_id"], c["sha256"], tuple(LamResult(**r) for r in c["results"]))
                  for m, c in doc["models"].items()}
        return cls(doc["base_version"], doc["settings"], doc["hook"], tuple(doc["grid"]), models, doc["created_at"],
                   doc.get("seconds", {}), doc.get("kept_versions", False))


# -- calibrating ---------------------------------------------------------------------------------


def calibrate(url: str, hook: Hook, *, hook_name: str = "", grid: Sequence[float] = GRID,
              models: Sequence[str] | None = None, base_version: int | None = None, keep_versions: bool = False,
              device: str = "cpu", log: Callable[[str], None] | None = None) -> Calibration:
    """Calibrate, record and return (see the module docstring)."""
    log = log or (lambda line: None)
    grid = check_grid(grid)
    store = Store.open(url)
    catalog = store.catalog()
    base = catalog.version(base_version)
    calibrated = tuple(models) if models else tuple(base.models)
    for m in calibrated:
        if m not in base.models:
            raise InvalidInputError(f"model {m!r} is not part of version {base.version} "
                                    f"(models: {', '.join(base.models)})")
    if len(set(calibrated)) != len(calibrated):
        raise InvalidInputError(f"--models names a model twice: {list(calibrated)}")
    created: list[VersionRecord] = []
    seconds = {"merge": 0.0, "statistics": 0.0, "hook": 0.0}
    try:
        scores: dict[str, dict[float, float]] = {m: {} for m in calibrated}
        records = []
        for lam in grid:  # the hook runs right after each merge, so a broken hook fails early
            t0 = time.perf_counter()
            if all(base.lams[base.models.index(m)] == lam for m in calibrated):
                record = base  # the base version is this grid point already: reused, never removed
            else:
                record = _merge_at(url, base, {m: lam for m in calibrated}, device)
                created.append(record)
            records.append(record)
            t1 = time.perf_counter()
            for m in calibrated:
                scores[m][lam] = _score(hook, hook_name, m, url, record.version, lam)
            seconds["merge"] += t1 - t0
            seconds["hook"] += time.perf_counter() - t1
            log(f"lambda {lam:g}: version {record.version} (merge {t1 - t0:.1f} s, hook {time.perf_counter() - t1:.1f} s): "
                + ", ".join(f"{m} {scores[m][lam]:.4f}" for m in calibrated))
        t0 = time.perf_counter()
        versions = {lam: VersionWeights(store, r.version) for lam, r in zip(grid, records)}
        errors = reconstruction_error(StoreWeights(store), versions, calibrated)
        seconds["statistics"] = time.perf_counter() - t0
        results = {m: [LamResult(lam, r.version, r.mask_density[r.models.index(m)], errors[m][lam], scores[m][lam])
                       for lam, r in zip(grid, records)] for m in calibrated}
        calibration = Calibration(
            base.version, settings_of(base), hook_name, grid,
            {m: ModelCalibration(m, catalog.model(m).sha256, tuple(results[m])) for m in calibrated},
            seconds={k: round(v, 3) for k, v in seconds.items()}, kept_versions=keep_versions)
        record_calibration(store, calibration)
        return calibration
    finally:
        if not keep_versions and created:
            remove_versions(store, created)


def _merge_at(url: str, base: VersionRecord, lams: Mapping[str, float], device: str) -> VersionRecord:
    """A version like ``base`` but for these lams, published without being served (no promote)."""
    from mmer_dist.merge.engine import merge
    from mmer_dist.merge.local import LocalBackend
    from mmer_dist.merge.options import resolve_compile

    request = merge_request_like(base, lams)
    compile = resolve_compile(None, Store.open(url).catalog())
    return merge(url, request, LocalBackend(), workers=1, compile=compile, device=device, progress=False,
                 promote=False)


def settings_of(record: VersionRecord) -> dict:
    """The merge settings of a version but its lams (``MergeSettings.record()``: null where unused)."""
    from mmer_dist.method.settings import MergeSettings

    return {k: v for k, v in MergeSettings.from_record(record).record().items() if k != "lams"}


def merge_request_like(record: VersionRecord, lams: Mapping[str, float]):
    """A merge request repeating version ``record`` with some models' lams replaced."""
    from mmer_dist.merge.engine import MergeRequest
    from mmer_dist.method.settings import MergeSettings

    settings = MergeSettings.from_record(record).with_lams(())
    return MergeRequest(settings, {**dict(zip(record.models, record.lams)), **lams}, tuple(record.models))


def _score(hook: Hook, name: str, model_id: str, url: str, version: int, lam: float) -> float:
    where = f"--eval {name or getattr(hook, '__name__', 'hook')} for model {model_id!r} at lambda {lam:g}"
    try:
        score = hook(model_id, url, version)
    except Exception as e:  # the user's code: its failure is reported as theirs, in one line
        raise InvalidInputError(f"{where} raised {type(e).__name__}: {e}") from None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise InvalidInputError(f"{where} returned {score!r}; a hook returns a finite number (higher is better)")
    return float(score)


def reconstruction_error(weights: StoreWeights, versions: Mapping[float, VersionWeights],
                         model_ids: Sequence[str]) -> dict[str, dict[float, float]]:
    """``||m_i o tau* - tau_i||_1 / ||tau_i||_1`` per model and lam, over the shared LLM rows.

    Semantics (the reference its test holds it to): with every LLM tensor of model i whole,
    tau_i = theta_i - theta_pre and m_i, tau* the version's, sum |where(m_i, tau*, 0) - tau_i|
    over all entries, divided by sum |tau_i| (0 when both are 0). Here one row block of each
    tensor is read at a time (theta_pre, theta_i, and each version's tau* and packed masks), and
    the sums are accumulated in float64."""
    err = {m: {lam: 0.0 for lam in versions} for m in model_ids}
    norm = {m: 0.0 for m in model_ids}
    for name, t in weights.tensors.items():
        for start in range(0, t.rows, t.rows_per_chunk):
            rows = (start, min(t.rows, start + t.rows_per_chunk))
            base = weights.base(name, rows).float()
            blocks = {lam: (v.tau_star(name, rows), v.packed_masks(name, rows)) for lam, v in versions.items()}
            for m in model_ids:
                tau_i = weights.original(name, m, rows).float() - base
                norm[m] += float(tau_i.abs().sum(dtype=torch.float64))
                for lam, (tau, packed) in blocks.items():
                    mask = unpack_bits(packed[versions[lam].model_index(m)], t.cols)
                    err[m][lam] += float((torch.where(mask, tau, 0.0) - tau_i).abs().sum(dtype=torch.float64))
    return {m: {lam: (e / norm[m] if norm[m] > 0 else (0.0 if e == 0 else math.inf)) for lam, e in per.items()}
            for m, per in err.items()}


# -- the record in the store -----------------------------------------------------------------------


def record_calibration(store: Store, calibration: Calibration) -> None:
    """Write ``calibration.json`` under the writer lock, after checking there that the models are
    still the ones calibrated (a concurrent writer may have changed the store meanwhile)."""
    with store.writer_lock():
        catalog = store.catalog()
        for m, c in calibration.models.items():
            if not catalog.has_model(m) or catalog.model(m).sha256 != c.sha256:
                raise StoreError(f"model {m!r} changed in the store while it was being calibrated; re-run")
        atomic_put(store.fs, store.abspath(layout.CALIBRATION), calibration.to_json().encode())


def read_calibration(store: Store) -> Calibration | None:
    if not store.exists_path(layout.CALIBRATION):
        return None
    try:
        return Calibration.from_json(store.get_bytes(layout.CALIBRATION).decode())
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{store.url}/{layout.CALIBRATION} is damaged ({type(e).__name__}: {e}); "
                         "re-run `mmer calibrate`") from None


def calibrated_lams(store: Store, model_ids: Sequence[str], catalog: Catalog | None = None) -> dict[str, float]:
    """The recorded lam of each of ``model_ids`` (``mmer merge --lam auto``); refused clearly when
    there is no calibration, a model was not calibrated, or it changed since."""
    calibration = read_calibration(store)
    if calibration is None:
        raise InvalidInputError(f"--lam auto: no lambda calibration is recorded in {store.url}; run "
                                "`mmer calibrate --store S --eval module:function` first")
    catalog = catalog if catalog is not None else store.catalog()
    missing = [m for m in model_ids if m not in calibration.models]
    if missing:
        raise InvalidInputError(f"--lam auto: no calibrated lambda for model(s) {', '.join(missing)} (calibrated: "
                                f"{', '.join(calibration.models)}); run `mmer calibrate --models ...`")
    changed = [m for m in model_ids if catalog.model(m).sha256 != calibration.models[m].sha256]
    if changed:
        raise InvalidInputError(f"--lam auto: model(s) {', '.join(changed)} changed since the calibration; re-run "
                                "`mmer calibrate`")
    return {m: calibration.models[m].best.lam for m in model_ids}


def auto_lams(store: Store, request) -> dict[str, float]:
    """``mmer merge --lam auto``: the calibrated lam of every model of ``request`` (a MergeRequest);
    a note on stderr when the merge's settings differ from those the lams were calibrated with."""
    catalog = store.catalog()
    model_ids = request.models or tuple(m.id for m in catalog.models)
    lams = calibrated_lams(store, model_ids, catalog)
    calibrated = read_calibration(store).settings
    asked = {k: v for k, v in request.settings.record().items() if k != "lams"}
    differs = [f"{k} {calibrated.get(k)!r} -> {asked[k]!r}" for k in sorted(asked) if asked[k] != calibrated.get(k)]
    if differs:
        print(f"note: --lam auto: the lambdas were calibrated with other settings ({', '.join(differs)})",
              file=sys.stderr)
    return lams


def remove_versions(store: Store, records: Sequence[VersionRecord]) -> None:
    """Unpublish and delete versions this process published (each checked, under the writer lock,
    to be exactly the record it published), leaving every other version alone."""
    with store.writer_lock():
        catalog = store.catalog()
        ours = {r.version for r in records if r in catalog.versions}
        if ours:
            store.commit(catalog.replace(versions=tuple(v for v in catalog.versions if v.version not in ours)),
                         catalog.seq)
        for v in sorted(ours):
            store.remove(layout.version_root(v))
