"""A pipeline stage as a Ray actor: ``mmer_dist.model.DecoderStage`` behind actor methods.

The LLM engine replica places one per range of layers in its placement group and chains their
``forward`` calls, passing each stage's output by reference (Ray moves it stage to stage, never
through the replica). Outputs leave a stage on the CPU so any node can take them.

An actor starts empty, with its imports done (torch and transformers are most of a stage's
start-up), and ``load`` gives it its layers: so a warm spare (``serve.pipeline.StagePool``) takes
a lost stage's place, or a new version's, in the time it takes to read the weights.
"""

from __future__ import annotations

import os

import ray
import torch

from mmer_dist.devices import resolve_device
from mmer_dist.model.stage import DecoderStage
from mmer_dist.store.store import Store
from mmer_dist.store.weights import VersionWeights


@ray.remote
class StageActor:
    def __init__(self, threads: int | None = None):
        torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
        self.stage: DecoderStage | None = None

    def load(self, store_url: str, version: int, first: int, stop: int, *, device: str, dtype: str,
             slot_budget_bytes: int) -> int:
        """Layers [first, stop) of ``version``; returns the stage's slot capacity."""
        weights = VersionWeights(Store.open(store_url), version)
        self.stage = DecoderStage(weights, first, stop, device=resolve_device(device, has_gpu=bool(ray.get_gpu_ids())),
                                  dtype=None if dtype == "auto" else getattr(torch, dtype),
                                  slot_budget_bytes=slot_budget_bytes)
        return self.stage.slot_capacity

    def forward(self, batch, hidden=None):
        out = self.stage.forward(batch, hidden)
        if isinstance(out, torch.Tensor):
            return out.cpu()
        return out

    def release(self, request_ids) -> int:
        return self.stage.release(request_ids)

    def stats(self) -> dict:
        return {**self.stage.stats(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def ready(self) -> bool:
        return True
