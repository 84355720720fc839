"""The Ray backend: one actor per shard, each reading and writing the store directly.

Only pass requests (thresholds, signs: bytes) go to actors and only partial results (counts)
come back; tensors never travel through the driver. Actors restart after a crash and their
pass calls are retried (``max_restarts`` / ``max_task_retries``): a pass over a shard is
idempotent (same chunks, same bytes), so a retry is always safe. Progress flows from the actors
through one small counter actor that the driver polls for its single progress bar.
"""

from __future__ import annotations

import os

import ray

from mmer_dist.merge.passes import MergeJob, ShardWorker, worker_memory_bytes
from mmer_dist.merge.plan import ShardSpec

ACTOR_RESTARTS = 4


@ray.remote(num_cpus=0)
class ProgressCounter:
    def __init__(self):
        self.total = 0

    def add(self, n: int) -> None:
        self.total += n

    def read(self) -> int:
        return self.total


@ray.remote
class ShardActor:
    """A ``ShardWorker`` living in a Ray worker process for the whole merge."""

    def __init__(self, job: MergeJob, shard: ShardSpec, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.worker = ShardWorker(job, shard)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def run(self, request, counter):
        pending = [0]

        def progress(n: int) -> None:
            pending[0] += n
            if pending[0] >= 1 << 22:  # report in batches: one small RPC per ~4M entries
                counter.add.remote(pending[0])
                pending[0] = 0

        result = self.worker.run(request, progress)
        counter.add.remote(pending[0])
        return result

    def pid(self) -> int:
        return os.getpid()


class RayBackend:
    name = "ray"

    def __init__(self, address: str = "local", worker_resources: dict[str, float] | None = None):
        self.address = address
        self.worker_resources = worker_resources or {}
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.nodes: dict[int, str] = {}

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        if self.address in ("local", None):
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=self.address, log_to_driver=False)

    def default_workers(self) -> int:
        self._connect()
        return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))

    def start(self, job: MergeJob, shards: list[ShardSpec]) -> None:
        self._connect()
        resources = ray.cluster_resources()
        n = len(shards)
        node_cpus = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")), default=1.0)
        # share the cluster's CPUs, but never ask one actor for more than one node has
        cpus = min(node_cpus, resources.get("CPU", 1.0) / n)
        gpus = min(1.0, resources.get("GPU", 0.0) / n)
        memory_cap = resources.get("memory", 0.0) / n
        if gpus > 0:
            job = MergeJob(**{**job.__dict__, "device": "cuda"})
        self.counter = ProgressCounter.remote()
        for s in shards:
            memory = min(memory_cap, worker_memory_bytes(job, s)) if memory_cap else None
            options = dict(num_cpus=cpus, num_gpus=gpus, memory=memory, max_restarts=ACTOR_RESTARTS,
                           max_task_retries=ACTOR_RESTARTS, scheduling_strategy="SPREAD")
            if self.worker_resources:
                options["resources"] = dict(self.worker_resources)
            self.actors[s.index] = ShardActor.options(**options).remote(job, s, threads=max(1, int(cpus)))
        self.nodes = dict(zip(self.actors, ray.get([a.node.remote() for a in self.actors.values()])))

    def run_pass(self, request, shards, progress):
        before = ray.get(self.counter.read.remote())
        refs = [self.actors[s.index].run.remote(request, self.counter) for s in shards]
        reported = before
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            now = ray.get(self.counter.read.remote())
            progress(now - reported)
            reported = now
        return ray.get(refs)

    def stop(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.actors = {}
