"""A pipeline stage as a Ray actor: ``mmer_dist.model.DecoderStage`` behind actor methods.

The LLM engine replica places one per range of layers in its placement group and chains their
``forward`` calls, passing each stage's output by reference (Ray moves it stage to stage, never
through the replica). Outputs leave a stage on the CPU so any node can take them.
"""

from __future__ import annotations

import os

import ray
import torch


@ray.remote
class StageActor:
    def __init__(self, store_url: str, version: int, first: int, stop: int, *, device: str, dtype: str,
                 slot_budget_bytes: int, threads: int | None = None):
        from mmer_dist.devices import resolve_device
        from mmer_dist.model.stage import DecoderStage
        from mmer_dist.store.store import Store
        from mmer_dist.store.weights import VersionWeights

        torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
        weights = VersionWeights(Store.open(store_url), version)
        self.stage = DecoderStage(weights, first, stop, device=resolve_device(device, has_gpu=bool(ray.get_gpu_ids())),
                                  dtype=None if dtype == "auto" else getattr(torch, dtype),
                                  slot_budget_bytes=slot_budget_bytes)

    def forward(self, batch, hidden=None):
        out = self.stage.forward(batch, hidden)
        if isinstance(out, torch.Tensor):
            return out.cpu()
        return out

    def release(self, request_ids) -> int:
        return self.stage.release(request_ids)

    def slot_capacity(self) -> int:
        return self.stage.slot_capacity

    def stats(self) -> dict:
        return {**self.stage.stats(), "node": ray.get_runtime_context().get_node_id()}

    def ready(self) -> bool:
        return True
