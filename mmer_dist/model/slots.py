"""Dense weight sets of a stage within a byte budget, least recently used first out.

Serving N models must not cost N dense copies: a stage keeps theta_bar (every expansion request's
text) pinned, and the other weight sets (theta_hat_i, subset means, ...) in slots that share
``budget_bytes``, rebuilt on the stage's device from the resident theta_pre + packed mask + tau*
when a step needs one that is not there (like vLLM's adapter slots). A step that needs more sets
than fit still runs: the sets beyond the budget are built for that step alone and dropped after
it ("transient"), so a batch is never refused for memory — only slower, which the scheduler
avoids by splitting batches by weight set (``Engine``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mmer_dist.model.dense import DenseWeights
from mmer_dist.store.weightsets import WeightSet


@dataclass
class SlotStats:
    hits: int = 0
    rebuilds: int = 0
    transient: int = 0
    evictions: int = 0
    rebuild_seconds: float = 0.0
    rebuilds_by_key: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"hits": self.hits, "rebuilds": self.rebuilds, "transient": self.transient,
                "evictions": self.evictions, "rebuild_seconds": round(self.rebuild_seconds, 4),
                "rebuilds_by_key": dict(self.rebuilds_by_key)}


class SlotPool:
    def __init__(self, build: Callable[[WeightSet], DenseWeights], budget_bytes: int,
                 pinned: Iterable[WeightSet] = ()):
        self._build = build
        self.budget_bytes = int(budget_bytes)
        self.pinned: dict[WeightSet, DenseWeights] = {}
        self.slots: OrderedDict[WeightSet, DenseWeights] = OrderedDict()
        self.stats = SlotStats()
        for key in pinned:
            self.pinned[key] = self._timed_build(key)

    @property
    def used_bytes(self) -> int:
        return sum(w.nbytes for w in self.slots.values())

    def resident(self) -> list[str]:
        return [str(k) for k in (*self.pinned, *self.slots)]

    def capacity(self, slot_bytes: int) -> int:
        """How many sets of ``slot_bytes`` the budget holds (the scheduler's batch limit)."""
        return self.budget_bytes // max(1, slot_bytes)

    def _timed_build(self, key: WeightSet) -> DenseWeights:
        started = time.perf_counter()
        weights = self._build(key)
        self.stats.rebuild_seconds += time.perf_counter() - started
        self.stats.rebuilds += 1
        self.stats.rebuilds_by_key[str(key)] = self.stats.rebuilds_by_key.get(str(key), 0) + 1
        return weights

    def acquire(self, keys: Iterable[WeightSet]) -> dict[WeightSet, DenseWeights]:
        """Dense weights for every key of one step; slots of the other keys may be evicted."""
        wanted = list(dict.fromkeys(keys))
        out: dict[WeightSet, DenseWeights] = {}
        for key in wanted:
            if key in self.pinned:
                out[key] = self.pinned[key]
            elif key in self.slots:
                self.slots.move_to_end(key)
                out[key] = self.slots[key]
                self.stats.hits += 1
        for key in wanted:
            if key in out:
                continue
            weights = self._timed_build(key)
            while self.slots and self.used_bytes + weights.nbytes > self.budget_bytes:
                victim = next((k for k in self.slots if k not in wanted), None)
                if victim is None:
                    break
                del self.slots[victim]
                self.stats.evictions += 1
            if self.used_bytes + weights.nbytes <= self.budget_bytes:
                self.slots[key] = weights
            else:
                self.stats.transient += 1  # used for this step only
            out[key] = weights
        return out
