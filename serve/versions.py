"""A server's store versions: load one, follow the serving pointer, switch, drain, lease.

``Versions`` owns every version one server holds: ``current`` (where new requests go) and the
retiring ones (requests admitted on them still running). ``pinned()`` holds the current version
for one request's whole life, so a switch (``switch_to``) never changes a running request: new
requests go to the new version at once, and the old one is dropped (its engine and stage actors
gone) when its last request ends. ``follow`` loads the target version beside the served one, or
rebuilds the served one when it lost a stage (a stage actor died: the engine has ended its
requests with a 503 and stopped); ``Follower`` calls it on its own thread, so following never
waits behind request work, and retries a follow that fails with backoff while the served
version keeps serving. Every version held is in the server's lease, so ``mmer gc`` keeps it.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mmer_dist.errors import MmerError
from mmer_dist.model.async_engine import AsyncEngine
from mmer_dist.model.engine import Engine, EngineLimits, Pipeline
from mmer_dist.store.serving import ServerLease
from mmer_dist.store.store import Store
from mmer_dist.store.weights import VersionWeights
from serve import log
from serve.chat import ChatAssets
from serve.component_files import component_folder
from serve.config import ServeOptions
from serve.errors import ApiError



@dataclass
class ServedVersion:
    """One loaded store version: its stages (``pipeline``), the step loop over them (``engine``)
    and every model's chat assets."""

    version: int
    weights: VersionWeights
    pipeline: Pipeline
    engine: AsyncEngine
    base: ChatAssets
    models: dict[str, ChatAssets]
    modalities: dict[str, str]
    tasks: dict[str, str | None] = field(default_factory=dict)  # a model added for a new task (`mmer add --task`)
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0  # requests admitted on this version and not yet finished
    closed: bool = False

    def candidates(self, part_type: str) -> list[str]:
        return [m for m, a in self.models.items() if a.media is not None and a.media.part_type == part_type]

    @property
    def failure(self) -> BaseException | None:
        """Why this version cannot answer any more (a lost stage), or None."""
        return self.engine.failure

    def close(self) -> None:
        """Stop its engine and kill its stage actors (idempotent)."""
        self.closed = True
        self.engine.shutdown()
        if (shutdown := getattr(self.pipeline, "shutdown", None)) is not None:
            shutdown()


class Versions:
    def __init__(self, options: ServeOptions, pipeline_factory: Callable[[VersionWeights], Pipeline],
                 cache_dir: str | Path | None = None, max_versions: int = 2):
        """``pipeline_factory(weights)`` places a version's stages; at most ``max_versions`` are
        held at once (a switch waits for older versions' last requests first)."""
        self.options = options
        self.max_versions = max_versions
        self._pipeline_factory = pipeline_factory
        self._cache = Path(cache_dir or tempfile.mkdtemp(prefix="mmer-serve-"))
        self.current: ServedVersion | None = None
        self._retiring: list[ServedVersion] = []
        self._lock = threading.RLock()  # versions change from the follower thread and the event loop
        self._switching = threading.Lock()
        self.lease = ServerLease(options.store)  # `mmer gc` keeps every version this server holds
        self.changed = threading.Event()  # the follower is needed now: a version lost a stage, a new pin
        self.problem: str | None = None  # why the last follow failed (the follower sets it)
        self._assets: dict[tuple[str | None, str | None], ChatAssets] = {}  # (model, checkpoint digest)

    def load(self, version: int | None) -> ServedVersion:
        store = Store.open(self.options.store)
        weights = VersionWeights(store, version)
        base = self._chat_assets(weights, None)
        models, modalities, tasks = {}, {}, {}
        for m in weights.models:
            record = weights.catalog.model(m)
            tasks[m] = record.task
            models[m] = self._chat_assets(weights, m)
            modalities[m] = record.modality
        pipeline = self._pipeline_factory(weights)
        try:
            limits = EngineLimits(self.options.max_running, self.options.max_step_tokens)
            engine = AsyncEngine(Engine(pipeline, limits), name=f"mmer-engine-v{weights.version}",
                                 on_failure=self.changed.set)
        except BaseException:  # a failed load leaves nothing placed
            if (shutdown := getattr(pipeline, "shutdown", None)) is not None:
                shutdown()
            raise
        if (capacity := pipeline.slot_capacity()) == 0:
            log.warning("version %d: the slot budget (%d bytes per stage) holds no model's dense weights: every "
                        "model is served through the mask-native path", weights.version, self.options.slot_budget)
        else:
            log.info("version %d: dense slots for %d models per stage, the others served mask-native",
                     weights.version, capacity)
        return ServedVersion(weights.version, weights, pipeline, engine, base, models, modalities, tasks)

    def _chat_assets(self, weights: VersionWeights, model_id: str | None) -> ChatAssets:
        """A model's (None: the base's) tokenizer and template: loaded once per checkpoint, and
        shared by every version that holds it (a switch loads only the new models')."""
        record = weights.catalog.model(model_id) if model_id is not None else None
        key = (model_id, record.sha256 if record else None)
        with self._lock:
            if (assets := self._assets.get(key)) is not None:
                return assets
        root = self._cache / hashlib.sha256(self.options.store.encode()).hexdigest()[:12]
        folder = component_folder(weights, model_id, root, with_weights=False)
        assets = ChatAssets.load(folder, model_id, record.modality if record else None)
        with self._lock:
            return self._assets.setdefault(key, assets)

    def target_version(self, pinned: int | None) -> int:
        """The version to serve: the pinned one, else the store's serving pointer (the latest
        published version while no pointer is set)."""
        if pinned is not None:
            return pinned
        return Store.open(self.options.store).catalog().serving_version()

    def follow(self, pinned: int | None) -> bool:
        """Serve the target version: load it beside the served one and switch, or rebuild the
        served one if it lost a stage; True if it switched. Blocking (stages load): call it off
        the event loop. Never waits for old requests: while ``max_versions`` are held it
        returns False, and the next call tries again. Raises ``FollowError`` saying why a
        version cannot be served; the served one is then unchanged."""
        with self._switching:
            current = self.current
            broken = current if current is not None and current.failure is not None else None
            try:
                target = self.target_version(pinned)
            except Exception as e:
                if broken is None:
                    raise FollowError(f"the store's serving version cannot be read: {describe(e)}") from e
                target = broken.version  # the store cannot say: rebuild what was served
            if broken is None and current is not None and current.version == target:
                return False
            if broken is not None:
                log.warning("version %d lost a stage (%s); rebuilding version %d", broken.version,
                            describe(broken.failure), target)
                broken.close()  # its requests have ended; its bundles are needed
            self._drop_idle()
            running = [v for v in self.held() if not v.closed]  # a closed version holds no stages
            if len(running) >= self.max_versions:
                log.info("version %d waits for the last requests of version(s) %s", target,
                         [v.version for v in self._retiring])
                return False
            log.info("loading version %d", target)
            try:
                served = self.load(target)
            except Exception as e:
                raise FollowError(f"version {target} does not load: {describe(e)}") from e
            self.switch_to(served)
            log.info("serving version %d", target)
            return True

    def switch_to(self, served: ServedVersion) -> None:
        """New requests go to ``served`` from now on; the previous version finishes what it has."""
        with self._lock:
            old, self.current = self.current, served
            if old is not None and old is not served:
                self._retiring.append(old)
        self._drop_idle()
        self._hold()

    @contextlib.contextmanager
    def pinned(self) -> Iterator[ServedVersion]:
        """The current version, held for one request: it is not dropped before the request ends."""
        with self._lock:
            served = self.current
            if served is None:
                raise ApiError(503, "no version is loaded yet; retry shortly")
            if served.failure is not None or served.closed:
                raise ApiError(503, f"version {served.version} lost a stage and is being rebuilt; retry shortly")
            served.active += 1
        try:
            yield served
        finally:
            with self._lock:
                served.active -= 1
            self._drop_idle()

    def held(self) -> list[ServedVersion]:
        with self._lock:
            return [*self._retiring, *([self.current] if self.current else [])]

    def status(self) -> dict:
        """What ``/readyz`` says: ``loading``, ``serving vN`` or ``degraded: why``; ``ready`` when
        the current version answers."""
        current, problem = self.current, self.problem
        if current is None:
            return {"status": f"degraded: {problem}" if problem else "loading", "ready": False, "version": None}
        if current.failure is not None or current.closed:
            why = f"version {current.version} lost a stage ({describe(current.failure)}); rebuilding"
            return {"status": f"degraded: {why}" + (f"; {problem}" if problem else ""), "ready": False,
                    "version": current.version}
        text = f"serving v{current.version}"
        return {"status": f"degraded: {problem}; {text}" if problem else text, "ready": True,
                "version": current.version}

    def unhealthy(self) -> str | None:
        """Why this server cannot get better by itself (its replica should be replaced), or None."""
        current = self.current
        if current is None or current.failure is None:
            return None if current is None or current.engine.alive else "the engine's step loop died"
        return f"version {current.version} lost a stage and does not rebuild: {self.problem}" if self.problem else None

    def _hold(self) -> None:
        try:
            self.lease.hold([v.version for v in self.held()])
        except (OSError, MmerError) as e:  # a read-only store (a pinned RayService) still serves
            log.warning("could not write the server lease: %s", e)

    def _drop_idle(self) -> None:
        with self._lock:
            idle = [v for v in self._retiring if v.active == 0 or v.closed]
            self._retiring = [v for v in self._retiring if v not in idle]
        if idle:
            self._hold()
            with self._lock:  # the chat assets of models no held version has any more go too
                used = {id(a) for v in self.held() for a in (v.base, *v.models.values())}
                self._assets = {k: a for k, a in self._assets.items() if id(a) in used}
        for v in idle:
            v.close()
            log.info("version %d dropped (no requests left)", v.version)

    def shutdown(self) -> None:
        for v in self.held():
            v.close()
        self._retiring, self.current = [], None
        self.lease.release()


class FollowError(MmerError):
    """A version cannot be served (its load failed, the store does not answer); says which and why."""


def describe(e: BaseException | None) -> str:
    """An exception as one line: our own errors name their problem; others are prefixed by type."""
    if e is None:
        return "no error"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, MmerError) and text else f"{type(e).__name__}: {text}" if text else type(e).__name__


class Follower:
    """Keeps ``versions`` on the target version from its own thread, so a promoted version is
    picked up however busy the replica's event loop and executors are: every ``interval_s``, or
    at once when ``versions.changed`` is set (a lost stage, a new pin). A follow that fails leaves
    the served version as it is, says why in ``versions.problem`` (``/readyz``) and one log line,
    and is retried with exponential backoff up to ``max_backoff_s``."""

    def __init__(self, versions: Versions, interval_s: float, pinned: int | None, max_backoff_s: float = 30.0):
        self.versions, self.interval_s, self.pinned, self.max_backoff_s = versions, interval_s, pinned, max_backoff_s
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmer-follower", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def pin(self, version: int | None) -> None:
        self.pinned = version
        self.versions.changed.set()

    def _run(self) -> None:
        wait = self.interval_s
        while True:
            self.versions.changed.wait(wait)
            if self._stop.is_set():
                return
            self.versions.changed.clear()
            try:
                self.versions.follow(self.pinned)
            except Exception as e:  # noqa: BLE001 - a bad version (or a store hiccup) must not take the endpoint down
                self.failures += 1
                wait = min(self.max_backoff_s, max(self.interval_s, 1.0) * 2 ** (self.failures - 1))
                current = self.versions.current
                self.versions.problem = f"{describe(e)} (attempt {self.failures}, next in {wait:g} s)"
                log.warning("%s; still serving version %s", self.versions.problem,
                            current.version if current else None)
            else:
                self.failures, wait, self.versions.problem = 0, self.interval_s, None

    def stop(self) -> None:
        self._stop.set()
        self.versions.changed.set()
        self._thread.join(timeout=5)
