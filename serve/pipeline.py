"""A pipeline of stage actors: what one LLM engine replica runs a version on.

Implements ``mmer_dist.model.engine.Pipeline`` over Ray actors: a step's ``StepBatch`` is put in
the object store once and every stage reads it from there; each stage's hidden states go to the
next stage as an object reference, so a step costs one actor call per stage and one ``ray.get``
at the end (DESIGN.md: ~1.7 ms per actor call on a 2-core machine, ~10 ms per Serve handle hop).
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mmer_dist.model.config import DecoderConfig
from mmer_dist.model.engine import split_layers
from mmer_dist.store.weights import VersionWeights
from serve.config import ServeOptions
from serve.stage import StageActor

# Each bundle of the replica's placement group holds half its resources per stage actor, so a
# version can load beside the one being served (a switch) without new bundles.
VERSIONS_PER_BUNDLE = 2


def stage_bundle(options: ServeOptions) -> dict[str, float]:
    bundle = {"CPU": 1.0, **options.stage_resources}
    if options.stage_gpus:
        bundle["GPU"] = float(options.stage_gpus)
    return bundle


class RayPipeline:
    def __init__(self, weights: VersionWeights, options: ServeOptions, placement_group: PlacementGroup | None,
                 first_bundle: int = 1):
        config = DecoderConfig.from_base_config(weights.base_config)
        self.version = weights.version
        self.vocabulary = weights.vocabulary
        self.max_positions = config.max_positions
        share = {k: v / VERSIONS_PER_BUNDLE for k, v in stage_bundle(options).items()}
        cpus, gpus = share.pop("CPU"), share.pop("GPU", 0.0)
        self.actors = []
        for i, (first, stop) in enumerate(split_layers(config.n_layers, options.stages)):
            strategy = (PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=first_bundle + i)
                        if placement_group is not None else "DEFAULT")
            actor = StageActor.options(
                num_cpus=cpus, num_gpus=gpus, resources=share or None,
                scheduling_strategy=strategy, max_concurrency=1,
            ).remote(weights.store.url, weights.version, first, stop, device=options.device, dtype=options.dtype,
                     slot_budget_bytes=options.slot_budget)
            self.actors.append(actor)
        ray.get([a.ready.remote() for a in self.actors])  # surface a stage's load error here
        self._capacity = min(ray.get([a.slot_capacity.remote() for a in self.actors]))

    def forward(self, batch):
        batch_ref = ray.put(batch)
        hidden = None
        for actor in self.actors[:-1]:
            hidden = actor.forward.remote(batch_ref, hidden)
        return ray.get(self.actors[-1].forward.remote(batch_ref, hidden))

    def release(self, request_ids: Sequence[str]) -> None:
        ray.get([a.release.remote(list(request_ids)) for a in self.actors])

    def slot_capacity(self) -> int:
        return self._capacity

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
