"""A pipeline of stage actors: what one LLM engine replica runs a version on.

Implements ``mmer_dist.model.engine.Pipeline`` over Ray actors: a step's ``StepBatch`` is put in
the object store once and every stage reads it from there; each stage's hidden states go to the
next stage as an object reference, so a step costs one actor call per stage and one ``ray.get``
at the end (DESIGN.md: ~1.7 ms per actor call on a 2-core machine, ~10 ms per Serve handle hop).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mmer_dist.model.config import DecoderConfig
from mmer_dist.model.engine import StageLostError, split_layers
from mmer_dist.store.weights import VersionWeights
from serve.config import ServeOptions
from serve.errors import UNAVAILABLE, root_cause
from serve.stage import StageActor

# Each bundle of the replica's placement group holds a third of its resources per stage actor: a
# version's stage, the stage of a version loading beside it (a switch) and a warm spare.
SHARES_PER_BUNDLE = 3


def stage_bundle(options: ServeOptions) -> dict[str, float]:
    bundle = {"CPU": 1.0, **options.stage_resources}
    if options.stage_gpus:
        bundle["GPU"] = float(options.stage_gpus)
    return bundle


class StagePool:
    """Where a replica's stage actors come from: ``take(i)`` gives stage ``i``'s warm spare (an
    actor started earlier, imports done, no weights), or a new actor when there is none;
    ``refill()`` starts the missing spares in the background (after a pipeline has loaded, so they
    never compete with it). With ``spare_stages`` off there are none. Actor ``i`` goes to bundle
    ``first_bundle + i`` of the replica's placement group."""

    def __init__(self, options: ServeOptions, placement_group: PlacementGroup | None, first_bundle: int = 1):
        self.options, self.placement_group, self.first_bundle = options, placement_group, first_bundle
        self._spares: dict[int, ray.actor.ActorHandle] = {}
        self._lock = threading.Lock()
        self.refill()

    def _start(self, i: int) -> ray.actor.ActorHandle:
        share = {k: v / SHARES_PER_BUNDLE for k, v in stage_bundle(self.options).items()}
        cpus, gpus = share.pop("CPU"), share.pop("GPU", 0.0)
        strategy = (PlacementGroupSchedulingStrategy(self.placement_group,
                                                     placement_group_bundle_index=self.first_bundle + i)
                    if self.placement_group is not None else "DEFAULT")
        return StageActor.options(num_cpus=cpus, num_gpus=gpus, resources=share or None,
                                  scheduling_strategy=strategy, max_concurrency=1).remote()

    def take(self, i: int) -> ray.actor.ActorHandle:
        with self._lock:
            actor = self._spares.pop(i, None)
        return actor if actor is not None else self._start(i)

    def refill(self) -> None:
        if not self.options.spare_stages:
            return
        with self._lock:
            for i in range(self.options.stages):
                if i not in self._spares:
                    self._spares[i] = self._start(i)

    def shutdown(self) -> None:
        with self._lock:
            spares, self._spares = list(self._spares.values()), {}
        for actor in spares:
            ray.kill(actor, no_restart=True)


class RayPipeline:
    """A version's stage actors. A stage whose process died (or a step past ``step_timeout_s``)
    is ``StageLostError``: the engine ends its requests and the version is rebuilt (``serve.versions``);
    a pipeline that fails to start kills the stages it already placed."""

    def __init__(self, weights: VersionWeights, options: ServeOptions, pool: StagePool):
        config = DecoderConfig.from_base_config(weights.base_config)
        self.version = weights.version
        self.vocabulary = weights.vocabulary
        self.max_positions = config.max_positions
        self.step_timeout_s = options.step_timeout_s
        self.actors = []
        try:
            loads = []
            for i, (first, stop) in enumerate(split_layers(config.n_layers, options.stages)):
                self.actors.append(pool.take(i))
                loads.append(self.actors[-1].load.remote(
                    weights.store.url, weights.version, first, stop, device=options.device, dtype=options.dtype,
                    slot_budget_bytes=options.slot_budget))
            self._capacity = min(self._get(loads))  # a stage's load error surfaces here
        except BaseException:
            self.shutdown()
            raise
        pool.refill()

    def _get(self, refs, timeout: float | None = None):
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError:
            raise StageLostError(f"a stage of version {self.version} did not answer within {timeout:g} s") from None
        except RayError as e:
            if isinstance(cause := root_cause(e), UNAVAILABLE):
                raise StageLostError(f"a stage actor of version {self.version} is gone ({type(cause).__name__})") \
                    from None
            raise

    def forward(self, batch):
        batch_ref = ray.put(batch)
        hidden = None
        for actor in self.actors[:-1]:
            hidden = actor.forward.remote(batch_ref, hidden)
        return self._get(self.actors[-1].forward.remote(batch_ref, hidden), timeout=self.step_timeout_s)

    def release(self, request_ids: Sequence[str]) -> None:
        self._get([a.release.remote(list(request_ids)) for a in self.actors], timeout=self.step_timeout_s)

    def slot_capacity(self) -> int:
        return self._capacity

    def stats(self) -> list[dict]:
        return self._get([a.stats.remote() for a in self.actors], timeout=self.step_timeout_s)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)  # a dead one is killed already: Ray says nothing
        self.actors = []
