"""The MMER method as small pure functions over torch tensors (float32 task-vector math).

No I/O, no Ray, no zarr here. Steps: ``task_vectors`` -> ``trim`` (exact thresholds by
``select``) -> ``elect`` (sign, disjoint mean) -> ``masks`` -> ``reconstruct``; ``baselines``
holds TA, NaiveMC and DARE; ``streaming`` runs the steps chunk by chunk in mergeable passes;
``reference`` is the whole-tensor oracle the tests compare everything with.
"""

from mmer_dist.method.settings import MERGE_METHODS, MergeSettings
from mmer_dist.method.streaming import (
    ChunkReader,
    ChunkSpec,
    ChunkWriter,
    FinalStats,
    MergeDriver,
    run_local,
    run_pass,
)

__all__ = [
    "MERGE_METHODS",
    "ChunkReader",
    "ChunkSpec",
    "ChunkWriter",
    "FinalStats",
    "MergeDriver",
    "MergeSettings",
    "run_local",
    "run_pass",
]
