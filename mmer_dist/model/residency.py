"""Which models should hold a stage's dense slots: those that would have cut the bytes the recent
steps read, the recent traffic's model mix decides.

What a step reads (DESIGN.md, "Many models in one endpoint"): each dense set it uses once
(``dense_bytes``), and, if any of its models has no slot, theta_pre + tau* once for all of those
(``native_bytes``) plus their masks (``mask_bytes`` each). Against serving every model on the
mask-native path, a slot set S saves on a step whose models are M:

    all of M in S:   native_bytes - |M & S| * dense_bytes + |M & S| * mask_bytes
    otherwise:                    - |M & S| * dense_bytes + |M & S| * mask_bytes

So a slot pays when its models often make up a whole step (one model carrying the traffic, or two
taking turns); when the traffic spreads over more models than slots, steps read theta_pre + tau*
anyway and a slot only adds its own bytes: then no slot is best, and none is kept. The model
mix of the last ``window`` steps is the evidence (``Traffic``); ``best_slots`` proposes the slot
set to move to, only for a saving of ``min_gain`` dense sets per step on average (hysteresis: a
build is a pass over the stage's weights, so a marginal gain never churns).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from mmer_dist.store.weightsets import WeightSet


@dataclass(frozen=True)
class StepBytes:
    native_bytes: int  # theta_pre + tau*: read once by a step with any mask-native model
    dense_bytes: int  # one dense weight set
    mask_bytes: int  # one model's packed masks


class Traffic:
    """The set of models (``hat`` weight sets) of each of the last ``window`` steps."""

    def __init__(self, window: int = 64):
        self.steps: deque[frozenset[WeightSet]] = deque(maxlen=window)

    def add(self, keys: Iterable[WeightSet]) -> None:
        self.steps.append(frozenset(k for k in keys if k.kind == "hat"))

    def models(self) -> set[WeightSet]:
        return set().union(*self.steps) if self.steps else set()


def bytes_saved(slots: frozenset[WeightSet], traffic: Traffic, cost: StepBytes) -> int:
    """What ``slots`` would have saved over the recorded steps, against no slot at all."""
    total = 0
    for models in traffic.steps:
        held = len(models & slots)
        if held:
            total += (cost.native_bytes if held == len(models) else 0) - held * (cost.dense_bytes - cost.mask_bytes)
    return total


def best_slots(slots: frozenset[WeightSet], traffic: Traffic, capacity: int, cost: StepBytes,
               rank: dict[WeightSet, float], min_gain: float = 0.25) -> frozenset[WeightSet] | None:
    """The set of at most ``capacity`` models that would have saved the most bytes over the
    recorded steps, when it beats the current ``slots`` by ``min_gain`` dense sets per recorded step
    on average; None to keep ``slots``. Candidates: no slot, each distinct model set the steps had
    (small enough), topped up with the current slots in ``rank`` order (a pair of models taking
    turns is found as a pair: no single one of them would save anything)."""
    if not traffic.steps:
        return None
    keep = sorted(slots, key=lambda k: -rank.get(k, 0.0))
    candidates = {frozenset()}
    for models in set(traffic.steps):
        if 0 < len(models) <= capacity:
            room = capacity - len(models)
            candidates.add(models | frozenset([k for k in keep if k not in models][:room]))
    now = bytes_saved(slots, traffic, cost)
    best, best_saved = None, now + min_gain * len(traffic.steps) * cost.dense_bytes
    for target in sorted(candidates, key=lambda t: sorted(map(str, t))):  # a fixed order: ties resolve alike
        saved = bytes_saved(target, traffic, cost)
        if saved > best_saved:
            best, best_saved = target, saved
    return best
