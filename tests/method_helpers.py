"""In-memory chunk reader/writer and random models for the method tests."""

from __future__ import annotations

import torch

from mmer_dist.method import ChunkSpec, MergeDriver, MergeSettings, run_local
from mmer_dist.method.kernels import ChunkKernels
from mmer_dist.method.masks import unpack_bits


def as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(t.shape[0], -1)


def chunk_specs(base: dict[str, torch.Tensor], rows_per_chunk: int | dict[str, int]) -> list[ChunkSpec]:
    specs = []
    for name in sorted(base):
        rows, cols = as_2d(base[name]).shape
        step = rows_per_chunk[name] if isinstance(rows_per_chunk, dict) else rows_per_chunk
        for i, start in enumerate(range(0, rows, step)):
            specs.append(ChunkSpec(name, i, start, min(rows, start + step), cols))
    return specs


class MemoryReader:
    def __init__(self, base, models):
        self.base, self.models = base, models

    def read(self, chunk: ChunkSpec):
        sl = slice(chunk.row_start, chunk.row_stop)
        base = as_2d(self.base[chunk.tensor])[sl]
        models = torch.stack([as_2d(m[chunk.tensor])[sl] for m in self.models])
        return models, base


class MemoryWriter:
    def __init__(self, base, n_models):
        self.tau_star = {k: torch.full(as_2d(v).shape, float("nan")) for k, v in base.items()}
        self.masks = [{k: torch.zeros(as_2d(v).shape, dtype=torch.bool) for k, v in base.items()} for _ in range(n_models)]
        self.shapes = {k: v.shape for k, v in base.items()}

    def write(self, chunk: ChunkSpec, tau_star, packed):
        sl = slice(chunk.row_start, chunk.row_stop)
        self.tau_star[chunk.tensor][sl] = tau_star
        for i, p in enumerate(packed):
            self.masks[i][chunk.tensor][sl] = unpack_bits(p, chunk.cols)

    def result(self):
        ts = {k: v.reshape(self.shapes[k]) for k, v in self.tau_star.items()}
        ms = [{k: v.reshape(self.shapes[k]) for k, v in m.items()} for m in self.masks]
        return ts, ms


def streaming_merge(base, models, settings: MergeSettings, model_ids, rows_per_chunk=3, compile=False,
                    cached_high=None):
    chunks = chunk_specs(base, rows_per_chunk)
    sizes = {k: v.numel() for k, v in base.items()}
    driver = MergeDriver(settings, sizes, len(models), cached_high=cached_high)
    writer = MemoryWriter(base, len(models))
    kernels = ChunkKernels(settings, list(model_ids), compile=compile)
    stats = run_local(driver, chunks, MemoryReader(base, models), kernels, writer)
    ts, ms = writer.result()
    return ts, ms, driver, stats


def random_models(n_models=3, shapes=None, dtype=torch.float32, seed=0, scale=0.01, quantum=None):
    """A base and n fine-tuned models; ``quantum`` rounds deltas to multiples (forces ties)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (7, 5), "b.weight": (4, 9), "norm.weight": (11,)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    models = []
    for _ in range(n_models):
        m = {}
        for k, b in base.items():
            d = torch.randn(b.shape, generator=g) * scale
            if quantum:
                d = torch.round(d / quantum) * quantum
            m[k] = (b.float() + d).to(dtype)
        models.append(m)
    return base, models
