"""Dense weight sets of a stage within a byte budget, chosen by the traffic and built off the step loop.

A dense slot holds a weight set (theta_hat_i, a subset mean, ...) as plain serving tensors: the
fastest way to run its tokens. Serving N models must not cost N dense copies, so a stage keeps
theta_bar (every expansion request's text) pinned and the other sets in slots that share
``budget_bytes``. A model without a slot is still served, by the mask-native path
(``masked_linear``): slots only make the busiest models faster.

Which models hold slots follows the recent traffic, not the last step's order: every
``plan_every`` steps, the slot set that would have read the fewest bytes over the last steps
(``residency.best_slots``: a slot pays when its models often make up a whole step, so that the
step skips the mask-native pass over theta_pre + tau*; when traffic spreads over more models than
slots, no slot is best). ``begin_step`` runs between steps and never waits for a build:

1. a finished background build is installed (its model switches from the mask-native path to the
   slot from this step on);
2. if no build is running and the plan moves to another slot set, the slots leaving it are freed
   at once (their models go mask-native) and one missing slot's build starts on the builder
   thread (on CUDA, on its own stream; the slot is installed once the stream's work is done).

Each set's recent share of tokens (``Demand``) is kept for the stats and orders the rest.

Sets that have no mask-native path (a subset mean, theta*, theta_pre) are built when a step needs
them and is not resident, on the step (``take``): they are rare (the ``present-mean`` text policy,
benchmarks). So is every set of a stage built with ``mask_native=False`` (weights served from a
custom fetcher). Such a set goes into a slot when the budget has room after freeing sets the step
does not use, else serves that step alone ("transient").
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from mmer_dist.model.dense import DenseWeights
from mmer_dist.model.residency import StepBytes, Traffic, best_slots
from mmer_dist.store.weightsets import WeightSet

log = logging.getLogger(__name__)


class Demand:
    """Tokens per weight set, each step's count added to the previous total decayed by half every
    ``half_life`` steps: a model's share of the recent traffic, smoothed over about that many steps."""

    def __init__(self, half_life: float = 64.0):
        self.decay = 0.5 ** (1.0 / half_life)
        self.tokens: dict[WeightSet, float] = {}

    def add_step(self, counts: dict[WeightSet, int]) -> None:
        for key in list(self.tokens):
            self.tokens[key] *= self.decay
            if self.tokens[key] < 1e-3 and key not in counts:
                del self.tokens[key]
        for key, n in counts.items():
            self.tokens[key] = self.tokens.get(key, 0.0) + n

    def __getitem__(self, key: WeightSet) -> float:
        return self.tokens.get(key, 0.0)

    def share(self, key: WeightSet) -> float:
        total = sum(self.tokens.values())
        return self.tokens.get(key, 0.0) / total if total else 0.0


@dataclass
class SetCounters:
    builds: int = 0
    build_seconds: float = 0.0
    evictions: int = 0


@dataclass
class SlotStats:
    hits: int = 0  # steps that found a needed set resident
    rebuilds: int = 0  # every build, background or not, pinned included
    background_builds: int = 0
    blocking_builds: int = 0  # builds a step waited for (sets with no mask-native path)
    transient: int = 0
    evictions: int = 0
    rebuild_seconds: float = 0.0
    per_set: dict[str, SetCounters] = field(default_factory=dict)

    def counters(self, key: WeightSet) -> SetCounters:
        return self.per_set.setdefault(str(key), SetCounters())

    def as_dict(self) -> dict:
        return {"hits": self.hits, "rebuilds": self.rebuilds, "background_builds": self.background_builds,
                "blocking_builds": self.blocking_builds, "transient": self.transient, "evictions": self.evictions,
                "rebuild_seconds": round(self.rebuild_seconds, 4),
                "rebuilds_by_key": {k: c.builds for k, c in self.per_set.items() if c.builds}}


@dataclass
class _Build:
    key: WeightSet
    future: Future
    started: float
    event: object | None = None  # a CUDA event recorded after the build's work on its stream


class SlotPool:
    """``build(key, background=False)`` makes a set's dense weights (``background``: on the builder
    thread, beside the steps: use few cores)."""

    def __init__(self, build: Callable[..., DenseWeights], budget_bytes: int, pinned: Iterable[WeightSet] = (),
                 *, slot_bytes: int | None = None, mask_native: bool = True, device: torch.device | None = None,
                 step_bytes: StepBytes | None = None, window: int = 64, plan_every: int = 4, min_gain: float = 0.25,
                 half_life: float = 64.0):
        self._build = build
        self.budget_bytes = int(budget_bytes)
        self.mask_native = mask_native
        self.device = device or torch.device("cpu")
        self.step_bytes = step_bytes  # None: no plan (slots only by ``take``)
        self.traffic = Traffic(window)
        self.plan_every, self.min_gain = plan_every, min_gain
        self._steps_to_plan = 0
        self.demand = Demand(half_life)
        self.stats = SlotStats()
        self.pinned: dict[WeightSet, DenseWeights] = {key: self._timed_build(key) for key in pinned}
        # what one dense set takes (every set of a stage has the same tensors): the first pinned one's
        self.slot_bytes = int(slot_bytes if slot_bytes is not None else next(iter(self.pinned.values())).nbytes)
        self.slots: dict[WeightSet, DenseWeights] = {}
        self._building: _Build | None = None
        self._lock = threading.Lock()  # guards _building between the step thread and stats readers
        self._executor: ThreadPoolExecutor | None = None
        self._stream = None

    # -- what a step asks ------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """How many dense sets (besides the pinned) the budget holds."""
        return self.budget_bytes // max(1, self.slot_bytes)

    @property
    def used_bytes(self) -> int:
        return sum(w.nbytes for w in self.slots.values())

    def dense(self, key: WeightSet) -> DenseWeights | None:
        weights = self.pinned.get(key)
        return weights if weights is not None else self.slots.get(key)

    def serves_natively(self, key: WeightSet) -> bool:
        """Whether a step may run ``key`` without dense weights (the mask-native path)."""
        return self.mask_native and key.kind == "hat"

    def begin_step(self, counts: dict[WeightSet, int]) -> None:
        """Between steps: record the step's tokens per set, install a finished build, start the
        next one (see the module docstring). Never waits for a build."""
        self.demand.add_step(counts)
        self.traffic.add(counts)
        self._install_finished()
        if self._building is None and self.mask_native:
            self._plan()
        self.stats.hits += sum(1 for k in counts if k in self.slots)

    def take(self, keys: Iterable[WeightSet]) -> dict[WeightSet, DenseWeights]:
        """Dense weights of every key the step must run dense (no mask-native path), building the
        missing ones now: the one place a step waits for a build."""
        wanted = list(dict.fromkeys(keys))
        out = {k: w for k in wanted if (w := self.dense(k)) is not None}
        for key in wanted:
            if key in out:
                continue
            weights = self._timed_build(key)
            self.stats.blocking_builds += 1
            for victim in sorted((k for k in self.slots if k not in wanted), key=lambda k: self.demand[k]):
                if self.used_bytes + self._reserved() + weights.nbytes <= self.budget_bytes:
                    break
                self._evict(victim)
            if self.used_bytes + self._reserved() + weights.nbytes <= self.budget_bytes:
                self.slots[key] = weights
            else:
                self.stats.transient += 1  # used for this step only
            out[key] = weights
        return out

    # -- residency by traffic --------------------------------------------------------------------

    def _plan(self) -> None:
        if self.capacity == 0 or self.step_bytes is None:
            return
        self._steps_to_plan -= 1
        if self._steps_to_plan > 0:
            return
        self._steps_to_plan = self.plan_every
        held = frozenset(k for k in self.slots if k.kind == "hat")
        room = self.capacity - (len(self.slots) - len(held))  # other sets' slots stay until a step frees them
        target = best_slots(held, self.traffic, room, self.step_bytes, self.demand.tokens, self.min_gain)
        if target is None:
            return
        for key in held - target:
            self._evict(key)
        missing = sorted(target - held, key=lambda k: -self.demand[k])
        if missing and self.used_bytes + self.slot_bytes <= self.budget_bytes:
            self._start(missing[0])
            self._steps_to_plan = 0  # the next one as soon as this one is in

    def _start(self, key: WeightSet) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmer-slot-build")
            # the idle builder thread ends with the pool (it holds no reference to it between builds)
            weakref.finalize(self, self._executor.shutdown, wait=False)
            if self.device.type == "cuda":
                self._stream = torch.cuda.Stream(self.device)
        with self._lock:
            self._building = _Build(key, self._executor.submit(self._background_build, key), time.perf_counter())

    def _background_build(self, key: WeightSet) -> tuple[DenseWeights, object | None]:
        if self._stream is None:
            return self._build(key, background=True), None
        with torch.cuda.stream(self._stream):
            weights = self._build(key, background=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return weights, event

    def _install_finished(self) -> None:
        build = self._building
        if build is None or not build.future.done():
            return
        try:
            weights, event = build.future.result()
        except Exception:  # a failed build leaves the model on the mask-native path
            log.exception("building the dense slot of %s failed; it stays on the mask-native path", build.key)
            with self._lock:
                self._building = None
            return
        if event is not None and not event.query():
            return  # its stream's work is still running: next step
        seconds = time.perf_counter() - build.started
        self._count_build(build.key, seconds)
        self.stats.background_builds += 1
        self.slots[build.key] = weights
        with self._lock:
            self._building = None

    def wait_for_build(self, timeout: float | None = None) -> WeightSet | None:
        """Block until the running build (if any) finishes; its key. For tests and benchmarks: the
        engine never calls it."""
        build = self._building
        if build is None:
            return None
        build.future.exception(timeout)
        if build.future.done() and (event := build.future.result()[1]) is not None:
            event.synchronize()
        return build.key

    @property
    def building(self) -> WeightSet | None:
        with self._lock:
            return None if self._building is None else self._building.key

    def _reserved(self) -> int:
        return self.slot_bytes if self._building is not None else 0

    def _evict(self, key: WeightSet) -> None:
        del self.slots[key]
        self.stats.evictions += 1
        self.stats.counters(key).evictions += 1

    def _timed_build(self, key: WeightSet) -> DenseWeights:
        started = time.perf_counter()
        weights = self._build(key)
        self._count_build(key, time.perf_counter() - started)
        return weights

    def _count_build(self, key: WeightSet, seconds: float) -> None:
        self.stats.rebuilds += 1
        self.stats.rebuild_seconds += seconds
        counters = self.stats.counters(key)
        counters.builds += 1
        counters.build_seconds += seconds

    def resident(self) -> list[str]:
        return [str(k) for k in (*self.pinned, *self.slots)]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
