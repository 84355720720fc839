"""In-memory chunk reader/writer and random models for the method tests."""

from __future__ import annotations

import os

import pytest
import torch

from mmer_dist.method import ChunkSpec, MergeDriver, MergeSettings, run_local
from mmer_dist.method.kernels import ChunkKernels
from mmer_dist.method.masks import unpack_bits

# Where the streaming path under test runs its kernels (the reference oracle stays on the CPU):
# `MMER_TEST_DEVICE=cuda pytest tests/test_method_*.py` checks the GPU path against the CPU oracle.
TEST_DEVICE = os.environ.get("MMER_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tests on tiny tensors. OpenMP's hand-off costs more than
    the work there, and on a loaded 2-core machine (CI, or other jobs running) eager ops on small
    tensors were measured 5-30x slower with 2 threads than with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(t.shape[0], -1)


def chunk_specs(base: dict[str, torch.Tensor], rows_per_chunk: int | dict[str, int]) -> list[ChunkSpec]:
    specs = []
    for name in sorted(base):
        rows, cols = as_2d(base[name]).shape
        step = rows_per_chunk[name] if isinstance(rows_per_chunk, dict) else rows_per_chunk
        for i, start in enumerate(range(0, rows, step)):
            specs.append(ChunkSpec(name, i, start, min(rows, start + step), cols, base[name].dim()))
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
        self.kept = {}  # (tensor, chunk index) -> MajorityAlternative

    def write(self, chunk: ChunkSpec, tau_star, packed):
        sl = slice(chunk.row_start, chunk.row_stop)
        self.tau_star[chunk.tensor][sl] = tau_star
        for i, p in enumerate(packed):
            self.masks[i][chunk.tensor][sl] = unpack_bits(p, chunk.cols)

    def keep_alternative(self, chunk: ChunkSpec, alternative):
        self.kept[(chunk.tensor, chunk.index)] = alternative

    def apply_alternative(self, chunk: ChunkSpec, sign: float) -> int:
        kept = self.kept.get((chunk.tensor, chunk.index))
        if kept is None or kept.sign != sign:
            return 0
        flat = chunk.row_start * chunk.cols + kept.entries
        self.tau_star[chunk.tensor].view(-1)[flat] = kept.tau_star
        for i, m in enumerate(kept.masks):
            self.masks[i][chunk.tensor].view(-1)[flat] = m
        return int(flat.numel())

    def result(self):
        ts = {k: v.reshape(self.shapes[k]) for k, v in self.tau_star.items()}
        ms = [{k: v.reshape(self.shapes[k]) for k, v in m.items()} for m in self.masks]
        return ts, ms


def streaming_merge(base, models, settings: MergeSettings, model_ids, rows_per_chunk=3, compile=False,
                    cached_high=None, block_elems=1 << 20, fuse=None, assumed=None):
    """The streaming merge in memory; ``assumed``: a decided state (thresholds and majority signs,
    ``MergeDriver.decided_state``'s form) to start from, its majority checked in the final pass,
    as a version derived from another does."""
    chunks = chunk_specs(base, rows_per_chunk)
    sizes = {k: v.numel() for k, v in base.items()}
    kernels = ChunkKernels(settings, list(model_ids), compile=compile, fuse=fuse)  # validates, naming model ids
    driver = MergeDriver(settings, sizes, len(models), cached_high=cached_high)
    if assumed is not None:
        driver.restore(assumed)
        driver.check_majority = True
    writer = MemoryWriter(base, len(models))
    stats = run_local(driver, chunks, MemoryReader(base, models), kernels, writer, block_elems=block_elems,
                      device=TEST_DEVICE)
    ts, ms = writer.result()
    return ts, ms, driver, stats


def split_merge(base, models, settings: MergeSettings, model_ids, rows_per_chunk, n_workers, rng):
    """Like ``streaming_merge``, but each pass runs over ``n_workers`` random splits of the chunks
    and the partials are combined in a random order (what a distributed backend does)."""
    from mmer_dist.method import run_pass
    from mmer_dist.method.streaming import merge_results

    chunks = chunk_specs(base, rows_per_chunk)
    order = torch.randperm(len(chunks), generator=rng).tolist()
    owner = torch.randint(0, n_workers, (len(chunks),), generator=rng).tolist()
    shards = [[chunks[i] for i in order if owner[i] == w] for w in range(n_workers)]
    shards = [s for s in shards if s]
    kernels = ChunkKernels(settings, list(model_ids))
    driver = MergeDriver(settings, {k: v.numel() for k, v in base.items()}, len(models))
    writer = MemoryWriter(base, len(models))
    reader = MemoryReader(base, models)
    while (request := driver.next_pass()) is not None:
        partials = [run_pass(request, s, reader, kernels, writer=writer, device=TEST_DEVICE) for s in shards]
        perm = torch.randperm(len(partials), generator=rng).tolist()
        driver.accept(merge_results([partials[i] for i in perm]))
    ts, ms = writer.result()
    return ts, ms, driver, driver.stats


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


# -- comparing the streaming path with the reference oracle ------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns, so equality is bit-for-bit (0.0 vs -0.0, NaN payloads)."""
    return t.to(torch.float32).contiguous().view(torch.int32)


def assert_bit_identical(stream_tau, stream_masks, ref, names=None):
    """tau* bit-identical and every mask identical to the reference's.

    Exact equality, not a tolerance: every path sums models in model order (DESIGN.md,
    ``task_vectors.model_sum``), so tau* must match bit for bit, and masks (which compare against
    tau*) must match even at exact ties.
    """
    names = names or sorted(ref.tau_star)
    for k in names:
        assert torch.equal(bits(stream_tau[k]), bits(ref.tau_star[k])), (
            f"tau* of {k!r} differs at {int((bits(stream_tau[k]) != bits(ref.tau_star[k])).sum())} entries")
        for i, (sm, rm) in enumerate(zip(stream_masks, ref.masks)):
            assert sm[k].dtype == torch.bool and torch.equal(sm[k], rm[k]), (
                f"mask of model {i} on {k!r} differs at {int((sm[k] != rm[k]).sum())} entries")


def per_model_high_histograms(base, models, names=None):
    """What ingest records: per model, per tensor, high-digit counts (2, M) of the raw tau_i."""
    from mmer_dist.method import select

    out = []
    for m in models:
        per_tensor = {}
        for k in (names or sorted(base)):
            tau = (m[k].float() - base[k].float()).unsqueeze(0)
            c = select.high_digit_counts(tau)
            per_tensor[k] = select.SparseCounts(c.keys, c.counts[:, 0])
        out.append(per_tensor)
    return out


def cached_high_histogram(base, models, scope):
    """Per-model ingest histograms grouped by selection group and stacked on a model axis, the
    way the merge engine builds ``MergeDriver(cached_high=...)`` from the store."""
    from mmer_dist.method import select
    from mmer_dist.method.trim import selection_group

    per_model = []
    for per_tensor in per_model_high_histograms(base, models):
        groups = {}
        for k, c in per_tensor.items():
            g = selection_group(k, scope)
            groups[g] = groups[g].merge(c) if g in groups else c
        per_model.append(groups)
    return select.GroupHistogram({g: select.SparseCounts.stack([pm[g] for pm in per_model], dim=1)
                                  for g in per_model[0]})


def topk_for_rank(d: int, k: int) -> float:
    """A K in (0, 1] whose trim rank d - int(d*K) is exactly k (1 <= k <= d; k = 0 gives 1.0)."""
    from mmer_dist.method.trim import trim_rank

    topk = 1.0 if k == 0 else (d - k + 0.5) / d
    assert trim_rank(d, topk) == k
    return topk
