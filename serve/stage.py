"""A pipeline stage as a Ray actor: ``mmer_dist.model.DecoderStage`` behind actor methods.

The LLM engine replica places one per range of layers in its placement group and chains their
``forward`` calls, passing each stage's output by reference (Ray moves it stage to stage, never
through the replica). Outputs leave a stage on the CPU so any node can take them.

An actor starts empty, with its imports done (torch and transformers are most of a stage's
start-up), and ``load`` gives it its layers: so a warm spare (``serve.pipeline.StagePool``) takes
a lost stage's place, or a new version's, in the time it takes to read the weights. This module
imports no torch: a replica places its stages before its own heavy imports.
"""

from __future__ import annotations

import os
import threading

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serve.config import ServeOptions


@ray.remote
class StageActor:
    def __init__(self, threads: int | None = None):
        # the imports are most of a stage's start-up: done here, before it is given weights (and
        # not at module import, so that placing stage actors costs the replica nothing)
        import torch

        import mmer_dist.model.stage  # noqa: F401  (transformers' Llama modules)

        torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
        self.stage = None

    def load(self, store_url: str, version: int, first: int, stop: int, *, device: str, dtype: str,
             slot_budget_bytes: int) -> int:
        """Layers [first, stop) of ``version``; returns the stage's slot capacity."""
        import torch

        from mmer_dist.devices import resolve_device
        from mmer_dist.model.stage import DecoderStage
        from mmer_dist.store.store import Store
        from mmer_dist.store.weights import VersionWeights

        weights = VersionWeights(Store.open(store_url), version)
        self.stage = DecoderStage(weights, first, stop, device=resolve_device(device, has_gpu=bool(ray.get_gpu_ids())),
                                  dtype=None if dtype == "auto" else getattr(torch, dtype),
                                  slot_budget_bytes=slot_budget_bytes)
        return self.stage.slot_capacity

    def forward(self, batch, hidden=None):
        out = self.stage.forward(batch, hidden)
        return out.cpu() if hasattr(out, "cpu") else out  # a hidden-state tensor; the last stage's logits list

    def release(self, request_ids) -> int:
        return self.stage.release(request_ids)

    def stats(self) -> dict:
        return {**self.stage.stats(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def ready(self) -> bool:
        return True


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
