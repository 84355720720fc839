"""A server's store versions: load one, follow the serving pointer, switch, drain, lease.

``Versions`` owns every version one server holds: ``current`` (where new requests go) and the
retiring ones (requests admitted on them still running). ``pinned()`` holds the current version
for one request's whole life, so a switch (``switch_to``) never changes a running request: new
requests go to the new version at once, and the old one is dropped (its engine and stage actors
gone) when its last request ends. ``follow`` loads the target version beside the served one;
``Follower`` calls it on its own thread, so following never waits behind request work. Every
version held is in the server's lease, so ``mmer gc`` keeps it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
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
from serve.chat import ChatAssets
from serve.config import ServeOptions
from serve.errors import ApiError

log = logging.getLogger(__name__)


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

    def candidates(self, part_type: str) -> list[str]:
        return [m for m, a in self.models.items() if a.media is not None and a.media.part_type == part_type]

    def close(self) -> None:
        self.engine.shutdown()
        if (shutdown := getattr(self.pipeline, "shutdown", None)) is not None:
            shutdown()


class Versions:
    def __init__(self, options: ServeOptions, pipeline_factory: Callable[[VersionWeights], Pipeline],
                 cache_dir: str | Path | None = None):
        """``pipeline_factory(weights)`` places a version's stages."""
        self.options = options
        self._pipeline_factory = pipeline_factory
        self._cache = Path(cache_dir or tempfile.mkdtemp(prefix="mmer-serve-"))
        self.current: ServedVersion | None = None
        self._retiring: list[ServedVersion] = []
        self._lock = threading.RLock()  # versions change from the follower thread and the event loop
        self._switching = threading.Lock()
        self.lease = ServerLease(options.store)  # `mmer gc` keeps every version this server holds

    def load(self, version: int | None) -> ServedVersion:
        store = Store.open(self.options.store)
        weights = VersionWeights(store, version)
        root = self._cache / hashlib.sha256(self.options.store.encode()).hexdigest()[:12]
        base = ChatAssets.load(weights.fetch_files(None, root / "base"), None, None)
        models, modalities, tasks = {}, {}, {}
        for m in weights.models:
            record = weights.catalog.model(m)
            tasks[m] = record.task
            folder = weights.fetch_files(m, root / f"{m}-{record.sha256[:12]}", weights=False)
            models[m] = ChatAssets.load(folder, m, record.modality)
            modalities[m] = record.modality
        pipeline = self._pipeline_factory(weights)
        limits = EngineLimits(self.options.max_running, self.options.max_step_tokens)
        engine = AsyncEngine(Engine(pipeline, limits), name=f"mmer-engine-v{weights.version}")
        return ServedVersion(weights.version, weights, pipeline, engine, base, models, modalities, tasks)

    def target_version(self, pinned: int | None) -> int:
        """The version to serve: the pinned one, else the store's serving pointer (the latest
        published version while no pointer is set)."""
        if pinned is not None:
            return pinned
        return Store.open(self.options.store).catalog().serving_version()

    def follow(self, pinned: int | None, max_versions: int = 2, drain_timeout_s: float = 600.0) -> bool:
        """Load and switch to the target version if it is not the one served; True if it switched.
        Blocking (the new version's stages load beside the old one): call it off the event loop.
        At most ``max_versions`` versions are held at once: a switch waits for older versions'
        last requests first."""
        with self._switching:
            target = self.target_version(pinned)
            if self.current is not None and self.current.version == target:
                return False
            deadline = time.monotonic() + drain_timeout_s
            while len(self._retiring) + 1 >= max_versions and time.monotonic() < deadline:
                time.sleep(0.1)
                self._drop_idle()
            log.info("switching to version %d", target)
            self.switch_to(self.load(target))
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
                raise ApiError(503, "no version is loaded yet")
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

    def _hold(self) -> None:
        try:
            self.lease.hold([v.version for v in self.held()])
        except (OSError, MmerError) as e:  # a read-only store (a pinned RayService) still serves
            log.warning("could not write the server lease: %s", e)

    def _drop_idle(self) -> None:
        with self._lock:
            idle = [v for v in self._retiring if v.active == 0]
            self._retiring = [v for v in self._retiring if v.active != 0]
        if idle:
            self._hold()
        for v in idle:
            v.close()
            log.info("version %d dropped (no requests left)", v.version)

    def shutdown(self) -> None:
        for v in self.held():
            v.close()
        self._retiring, self.current = [], None
        self.lease.release()


class Follower:
    """Calls ``versions.follow`` every ``interval_s`` on its own thread, so a promoted version
    is picked up however busy the replica's event loop and executors are. A load that fails
    leaves the served version as it is and is logged; the next poll tries again."""

    def __init__(self, versions: Versions, interval_s: float, pinned: int | None):
        self.versions, self.interval_s, self.pinned = versions, interval_s, pinned
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mmer-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.versions.follow(self.pinned)
            except Exception:  # noqa: BLE001 - a bad version (or a store hiccup) must not take the endpoint down
                current = self.versions.current
                log.exception("could not switch versions; still serving version %s",
                              current.version if current else None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
