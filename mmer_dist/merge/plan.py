"""Shard plan: which consecutive decoder layers (and so which chunks) each worker owns.

Embeddings go with the first shard, the final norm and LM head with the last. Layers are split
into contiguous ranges of about equal parameter count. Pure data: testable without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmer_dist.method.streaming import ChunkSpec
from mmer_dist.store.catalog import TensorRecord


@dataclass(frozen=True)
class ShardSpec:
    index: int
    first_layer: int
    last_layer: int
    tensors: tuple[str, ...]
    chunks: tuple[ChunkSpec, ...]

    @property
    def numel(self) -> int:
        return sum(c.numel for c in self.chunks)

    def describe(self) -> str:
        return f"shard {self.index} (layers {self.first_layer}..{self.last_layer}, {self.numel:,} params)"


def tensor_chunks(record: TensorRecord) -> list[ChunkSpec]:
    return [ChunkSpec(record.name, i, start, min(record.rows, start + record.rows_per_chunk), record.cols,
                      len(record.shape))
            for i, start in enumerate(range(0, record.rows, record.rows_per_chunk))]


def plan_shards(tensors: list[TensorRecord] | tuple[TensorRecord, ...], n_layers: int, n_shards: int) -> list[ShardSpec]:
    """Split the model into at most ``n_shards`` shards of consecutive decoder layers.

    Decoder layers are all the same size in Llama-family models, so an even split by count is an
    even split by parameters; the first shard also takes the embeddings, the last the head.
    """
    if n_shards < 1:
        raise ValueError(f"need at least one shard, got {n_shards}")
    n_shards = min(n_shards, max(1, n_layers))
    per_shard, remainder = divmod(n_layers, n_shards)
    bounds, start = [], 0
    for i in range(n_shards):
        stop = start + per_shard + (1 if i < remainder else 0)
        bounds.append((start, stop))
        start = stop
    order = sorted(tensors, key=lambda t: (t.layer, t.name))
    shards = []
    for i, (first, stop) in enumerate(bounds):
        lo = -(1 << 30) if i == 0 else first
        hi = (1 << 30) if i == n_shards - 1 else stop
        members = [t for t in order if lo <= t.layer < hi]
        chunks = tuple(c for t in members for c in tensor_chunks(t))
        shards.append(ShardSpec(i, first, stop - 1, tuple(t.name for t in members), chunks))
    return shards
