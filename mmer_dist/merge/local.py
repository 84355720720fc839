"""The single-process backend: every shard's pass runs here, one after another."""

from __future__ import annotations

from mmer_dist.merge.passes import MergeJob, ShardWorker
from mmer_dist.merge.plan import ShardSpec


class LocalBackend:
    name = "local"

    def start(self, job: MergeJob, shards: list[ShardSpec]) -> None:
        self.workers = {s.index: ShardWorker(job, s) for s in shards}

    def run_pass(self, request, shards, progress):
        return [self.workers[s.index].run(request, progress) for s in shards]

    def stop(self) -> None:
        self.workers = {}
