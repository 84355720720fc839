"""The Ray backend: one actor per shard, each reading and writing the store directly.

Only pass requests (thresholds, signs: bytes) go to actors and only partial results (counts)
come back; tensors never travel through the driver. Actors restart after a crash and their
pass calls are retried (``max_restarts`` / ``max_task_retries``): a pass over a shard is
idempotent (same chunks, same bytes), so a retry is always safe. Progress: on a terminal each
actor shows its shard's bar through Ray's tqdm integration (``ray.experimental.tqdm_ray``, drawn
by the driver from the actors' output); the driver's own count advances by a shard's entries when
that shard's pass returns (a retried shard counts once).
"""

from __future__ import annotations

import os
import sys

import ray

from mmer_dist.errors import MmerError
from mmer_dist.merge.passes import MergeJob, ShardWorker, worker_memory_bytes
from mmer_dist.merge.plan import ShardSpec
from mmer_dist.merge.progress import on_terminal

ACTOR_RESTARTS = 4
# How long start() waits for every shard actor to be placed and constructed (an autoscaling
# cluster may first have to add nodes) before failing with what it asked for.
START_TIMEOUT_S = float(os.environ.get("MMER_RAY_START_TIMEOUT", "900"))


# An actor's reader and writer threads run beside torch's OpenMP pool: idle OpenMP workers
# sleep instead of spinning on those threads' cores (see mmer_dist.cli.BULK_COMMANDS); set
# before the actor's process loads torch, unless the driver's environment chose a policy.
ACTOR_ENV = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


@ray.remote
class ShardActor:
    """A ``ShardWorker`` living in a Ray worker process for the whole merge."""

    def __init__(self, job: MergeJob, shard: ShardSpec, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.worker = ShardWorker(job, shard)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def run(self, request, show_bar: bool = False):
        if not show_bar:
            return self.worker.run(request)
        from ray.experimental.tqdm_ray import tqdm

        shard = self.worker.shard
        bar = tqdm(total=shard.numel, desc=f"{type(request).__name__} shard {shard.index}", unit="param")
        try:
            return self.worker.run(request, bar.update)
        finally:
            bar.close()

    def pid(self) -> int:
        return os.getpid()


def _fits(node_resources: dict, demand: dict) -> bool:
    return all(node_resources.get(k, 0.0) >= v for k, v in demand.items() if v)


class RayBackend:
    name = "ray"

    def __init__(self, address: str = "local", worker_resources: dict[str, float] | None = None,
                 start_timeout: float = START_TIMEOUT_S, bars: bool = False):
        self.address = address
        self.worker_resources = dict(worker_resources or {})
        self.start_timeout = start_timeout
        # actors' tqdm_ray bars, on a terminal only (Ray draws them from the actors' output)
        self.bars = bars and on_terminal()
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.nodes: dict[int, str] = {}

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        if self.address in ("local", None):
            # address="local": always a new embedded Ray; a bare ray.init() would join whatever
            # cluster this machine already runs (a `ray start` head, another test's Cluster)
            ray.init(address="local", include_dashboard=False, log_to_driver=self.bars)
        else:
            ray.init(address=self.address, log_to_driver=self.bars)

    def _worker_nodes(self) -> list[dict]:
        """Alive nodes that can host a shard actor: some CPU and every custom worker resource
        (a KubeRay head started with num-cpus 0 hosts none)."""
        demand = {"CPU": 1e-4, **self.worker_resources}
        return [n for n in ray.nodes() if n.get("Alive") and _fits(n.get("Resources", {}), demand)]

    def default_workers(self) -> int:
        self._connect()
        return max(1, len(self._worker_nodes()))

    def start(self, job: MergeJob, shards: list[ShardSpec]) -> None:
        self._connect()
        nodes = self._worker_nodes() or [n for n in ray.nodes() if n.get("Alive")]
        total = {k: sum(n["Resources"].get(k, 0.0) for n in nodes) for k in ("CPU", "GPU", "memory")}
        # what is free now: a merge beside a running endpoint (``mmer add``) takes what it leaves
        free = ray.available_resources()
        budget = {k: min(v, free.get(k, 0.0)) for k, v in total.items()}
        if budget["CPU"] < 0.1 * len(shards):  # nothing free at all: ask for a share and wait for it
            budget["CPU"] = total["CPU"]
        total = budget
        n = len(shards)
        node_cpus = max((node["Resources"].get("CPU", 0.0) for node in nodes), default=1.0)
        # share the worker nodes' CPUs, but never ask one actor for more than one node has
        cpus = min(node_cpus, (total["CPU"] or 1.0) / n)
        gpus = min(1.0, total["GPU"] / n)
        memory_cap = total["memory"] / n
        # actors compute where Ray gives them a device: CUDA with a GPU share, else CPU (a
        # driver-side "cuda" with no GPU in the cluster would fail in every actor)
        job = MergeJob(**{**job.__dict__, "device": "cuda" if gpus > 0 else "cpu"})
        demands = {}
        for s in shards:
            memory = min(memory_cap, worker_memory_bytes(job, s)) if memory_cap else None
            options = dict(num_cpus=cpus, num_gpus=gpus, memory=memory, max_restarts=ACTOR_RESTARTS,
                           max_task_retries=ACTOR_RESTARTS, scheduling_strategy="SPREAD",
                           runtime_env={"env_vars": ACTOR_ENV})
            if self.worker_resources:
                options["resources"] = dict(self.worker_resources)
            demands[s.index] = {"CPU": cpus, "GPU": gpus, "memory": memory or 0.0, **self.worker_resources}
            self.actors[s.index] = ShardActor.options(**options).remote(job, s, threads=max(1, int(cpus)))
        infeasible = [i for i, d in demands.items()
                      if not any(_fits(node.get("Resources", {}), d) for node in ray.nodes() if node.get("Alive"))]
        if infeasible:
            print(f"mmer: no alive Ray node can host shard actor(s) {infeasible} (each asks for "
                  f"{_describe(demands[infeasible[0]])}); waiting up to {self.start_timeout:.0f}s for the "
                  "cluster to add one", file=sys.stderr)
        try:
            refs = [a.node.remote() for a in self.actors.values()]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.start_timeout)
            if len(ready) < len(refs):
                missing = [i for i, r in zip(self.actors, refs) if r not in ready]
                raise MmerError(f"Ray could not start shard actor(s) {missing} within {self.start_timeout:.0f}s: "
                                f"each asks for {_describe(demands[missing[0]])}; the cluster has "
                                f"{_describe(ray.cluster_resources())}. Use fewer --workers or a bigger cluster.")
            self.nodes = dict(zip(self.actors, ray.get(refs)))
        except ray.exceptions.RayActorError as e:
            self.stop()  # the engine stops a backend only once start() has returned
            if not e.actor_init_failed:
                raise
            # e.g. a store URL the driver can open but the workers cannot (a path local to the driver)
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise MmerError(f"a shard worker could not start on its Ray node: {lines[-1] if lines else e}") from e
        except BaseException:
            self.stop()
            raise

    def run_pass(self, request, shards, progress):
        refs = {self.actors[s.index].run.remote(request, self.bars): s for s in shards}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                progress(refs[ref].numel)
        return ray.get(list(refs))

    def stop(self) -> None:
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = {}


def _describe(resources: dict) -> str:
    parts = []
    for k, v in sorted(resources.items()):
        if not v or k.startswith("node:") or k.startswith("accelerator_type") or k == "object_store_memory":
            continue
        parts.append(f"{k}={v / (1 << 30):.1f}GiB" if k == "memory" else f"{k}={v:g}")
    return ", ".join(parts)
