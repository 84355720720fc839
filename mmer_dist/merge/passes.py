"""One shard's work for one pass, reading and writing the store directly.

``run_shard_pass`` is what every backend executes: the local backend calls it in-process for
each shard, a Ray actor calls it for its own shard. It binds the store to the method's
streaming ``run_pass`` and, after a final pass, marks the shard complete in the staging area.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from mmer_dist.method import streaming
from mmer_dist.method.elect import SignCounts
from mmer_dist.method.kernels import EAGER_BLOCK_ENTRIES, ChunkKernels
from mmer_dist.method.masks import pack_bits, set_packed_bits, unpack_bits
from mmer_dist.method.settings import MergeSettings
from mmer_dist.merge.plan import ShardSpec
from mmer_dist.store import layout, mapped
from mmer_dist.store.mapped import MappedStack
from mmer_dist.store.store import Store
from mmer_dist.store.versions import Staging


@dataclass(frozen=True)
class MergeJob:
    """Everything a worker needs besides the shard; small and picklable."""

    store_url: str
    model_ids: tuple[str, ...]
    settings: MergeSettings
    version: int
    fingerprint: str
    compile: bool = False
    device: str = "cpu"
    # where compiled kernels are kept (resolved on the driver, so every actor on a node shares it)
    kernel_cache: str | None = None


class StoreChunkReader:
    """Reads one chunk of the base and of every model of the merge, stacked (N, rows, cols).

    Given the order in which chunks will be asked for (``prefetch``), it reads the next chunk in a
    background thread while the caller computes on the current one, so store latency (object
    stores, decompression) overlaps compute. At most two chunks are held at a time.
    """

    # Buffers cycled through: the chunk being computed on and the one being read ahead (a chunk
    # is valid until the next ``read``: every pass is done with it by then). Reusing them (instead
    # of a fresh allocation per chunk, which the kernel has to fault in page by page) saves sys
    # time. Each has a mapped twin: chunks whose files can be mapped side by side are not copied
    # at all. These two stacked chunks, (N + 1) x chunk entries each, are the only memory of a
    # merge that grows with N (``worker_memory_bytes``); mapped, they are the page cache's pages.
    RING = 2

    def __init__(self, store: Store, model_ids: tuple[str, ...], prefetch: Sequence[streaming.ChunkSpec] = (),
                 verified: set | None = None):
        self.store = store
        self.model_ids = model_ids
        self._verified = verified  # chunk files checksummed by an earlier pass (``Store.read_stacked``)
        self._next = dict(zip(prefetch, list(prefetch)[1:]))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmer-prefetch") if prefetch else None
        self._pending: dict[streaming.ChunkSpec, Future] = {}
        largest = max((c.numel for c in prefetch), default=0) * (len(model_ids) + 1) * 4
        self._ring = [torch.empty(largest, dtype=torch.uint8) for _ in range(self.RING)] if largest else []
        # address space only: pages are the page cache's, mapped while a chunk is in use (where
        # the process may not reserve it, e.g. under a tight address-space limit, chunks are copied)
        self._stacks: list[MappedStack] = []
        if largest and store.is_local and mapped.AVAILABLE:
            try:
                self._stacks = [MappedStack(largest) for _ in self._ring]
            except (OSError, ValueError):
                self._stacks = []
        self._turn = 0

    def _read_now(self, chunk: streaming.ChunkSpec, slot: tuple[torch.Tensor | None, MappedStack | None]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        # base and models in one buffer: one read per file, no stacking copy; fine-tunes in other
        # dtypes than the base come back upcast to float32 (exact), as task vectors need anyway
        paths = [f"{layout.BASE_LLM}/{chunk.tensor}"] + [f"{layout.model_llm(m)}/{chunk.tensor}" for m in self.model_ids]
        stacked = self.store.read_stacked(paths, chunk.row_start, chunk.row_stop, *slot, verified=self._verified)
        return stacked[1:], stacked[0]

    def _buffer(self) -> tuple[torch.Tensor | None, MappedStack | None]:
        """The next ring slot (buffer, mapped twin); called only from the caller's thread, in
        read order."""
        if not self._ring:
            return None, None
        self._turn = (self._turn + 1) % len(self._ring)
        return self._ring[self._turn], (self._stacks[self._turn] if self._stacks else None)

    def read(self, chunk: streaming.ChunkSpec) -> tuple[torch.Tensor, torch.Tensor]:
        pending = self._pending.pop(chunk, None)
        following = self._next.get(chunk)
        now = self._buffer() if pending is None else (None, None)
        if self._pool is not None and following is not None and following not in self._pending:
            self._pending[following] = self._pool.submit(self._read_now, following, self._buffer())
        return pending.result() if pending is not None else self._read_now(chunk, now)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()


class VersionWriter:
    """Writes tau* and the packed masks of all models of each chunk into the staged version.

    Writes happen on two background threads (tau* and the masks of a chunk as two tasks, at most
    two chunks queued) so that storing one chunk overlaps computing the next, and one chunk's
    tau* goes to the device while its masks are compressed; ``close`` waits for them and
    re-raises the first error, so a shard is only marked done once every byte is in the store.
    """

    def __init__(self, store: Store, version: int):
        self.store = store
        self.version = version
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mmer-write")
        self._pending: list[tuple[Future, Future]] = []  # per queued chunk: its tau* and masks writes

    def _write_now(self, path: str, chunk: streaming.ChunkSpec, block: torch.Tensor) -> None:
        # past the page cache: the server reads a version later, once; through the cache these
        # writes cost a copy each and evict the model chunks this merge is reading
        self.store.write_chunk(f"{path}/{chunk.tensor}", chunk.row_start, block, direct=True)

    def write(self, chunk: streaming.ChunkSpec, tau_star: torch.Tensor, packed: torch.Tensor) -> None:
        while len(self._pending) >= 2:
            for f in self._pending.pop(0):
                f.result()
        self._pending.append((self._pool.submit(self._write_now, layout.version_tau_star(self.version), chunk, tau_star),
                              self._pool.submit(self._write_now, layout.version_masks(self.version), chunk, packed)))

    def _alternative_path(self, chunk: streaming.ChunkSpec) -> str:
        # in the version's staging: removed with it when the version is published or abandoned
        return f"{layout.version_staging(self.version)}/majority/{chunk.tensor}/{chunk.index:06d}.npz"

    def keep_alternative(self, chunk: streaming.ChunkSpec, alternative: streaming.MajorityAlternative) -> None:
        out = io.BytesIO()
        np.savez(out, sign=np.float32(alternative.sign), entries=alternative.entries.to(torch.int64).numpy(),
                 tau_star=alternative.tau_star.numpy(), masks=pack_bits(alternative.masks).numpy(),
                 count=np.int64(alternative.entries.numel()))
        self.store.put_bytes(self._alternative_path(chunk), out.getvalue())

    def apply_alternative(self, chunk: streaming.ChunkSpec, sign: float) -> int:
        """Rewrites the chunk's tau* and masks where the kept alternative says (read back from the
        version, not from the models)."""
        path = self._alternative_path(chunk)
        if not self.store.exists_path(path):
            return 0
        with np.load(io.BytesIO(self.store.get_bytes(path)), allow_pickle=False) as kept:
            if float(kept["sign"]) != sign:
                return 0
            entries, tau_alt = torch.from_numpy(kept["entries"]), torch.from_numpy(kept["tau_star"])
            masks_alt = unpack_bits(torch.from_numpy(kept["masks"]), int(kept["count"]))
        tau_path = f"{layout.version_tau_star(self.version)}/{chunk.tensor}"
        mask_path = f"{layout.version_masks(self.version)}/{chunk.tensor}"
        tau_star = self.store.read(tau_path, slice(chunk.row_start, chunk.row_stop)).contiguous()
        masks = self.store.read(mask_path, slice(None), slice(chunk.row_start, chunk.row_stop)).contiguous()
        tau_star.view(-1)[entries] = tau_alt
        set_packed_bits(masks, chunk.cols, entries, masks_alt)
        self.write(chunk, tau_star, masks)
        return int(entries.numel())

    def close(self) -> None:
        try:
            for pair in self._pending:
                for f in pair:
                    f.result()
        finally:
            self._pending.clear()
            self._pool.shutdown(wait=True)


class ShardWorker:
    """Holds one shard's open store and compiled kernels across passes (a Ray actor wraps it)."""

    def __init__(self, job: MergeJob, shard: ShardSpec):
        self.job = job
        self.shard = shard
        self.store = Store.open(job.store_url)
        self.kernels = make_kernels(job)
        # each pass reads every chunk file again: its checksum is checked by the first that reads
        # it (the files are immutable and the merge holds the writer lock)
        self.verified: set = set()

    def run(self, request: streaming.PassRequest, progress: Callable[[int], None] | None = None):
        """Returns (partial result, seconds). A final pass marks the shard done when finished."""
        started = time.perf_counter()
        writer = VersionWriter(self.store, self.job.version) if request.writes or request.rewrites else None
        reader = StoreChunkReader(self.store, self.job.model_ids, prefetch=self.shard.chunks, verified=self.verified)
        try:
            result = streaming.run_pass(request, self.shard.chunks, reader, self.kernels, writer=writer,
                                        device=self.job.device, progress=progress)
        finally:
            reader.close()
            if writer is not None:
                writer.close()
        seconds = time.perf_counter() - started
        if request.writes:
            staging = Staging(self.store, self.job.version, self.job.fingerprint, resumed=True)
            staging.mark_shard_done(self.shard.index, final_stats_record(result, seconds))
        return result, seconds


def make_kernels(job: MergeJob) -> ChunkKernels:
    """Compiled kernels on CPU come ahead-of-time compiled from the on-disk cache (no tracing in
    this process); on GPUs torch.compile (inductor's own caches persist its work)."""
    fuse = None
    if job.compile and torch.device(job.device).type == "cpu":
        from mmer_dist.merge.kernel_cache import aot_fuser

        fuse = aot_fuser(job.kernel_cache)
    return ChunkKernels(job.settings, list(job.model_ids), compile=job.compile, fuse=fuse)


def final_stats_record(stats: streaming.FinalStats, seconds: float) -> dict:
    record = {"mask_counts": stats.mask_counts.tolist(), "nonzero": stats.nonzero, "entries": stats.entries,
              "seconds": seconds,
              "decided": [[g, sign, n, stats.decided.changes[(g, sign)].tolist() if (g, sign) in stats.decided.changes
                           else None] for (g, sign), n in stats.decided.entries.items()]}
    if stats.signs is not None:
        record["signs"] = {g: c.tolist() for g, c in stats.signs.groups.items()}
    return record


def final_stats_from_record(record: dict) -> streaming.FinalStats:
    signs = None
    if "signs" in record:
        signs = SignCounts({g: torch.tensor(c, dtype=torch.int64) for g, c in record["signs"].items()})
    decided = streaming.MajorityDecided(
        {(g, float(sign)): n for g, sign, n, _ in record["decided"]},
        {(g, float(sign)): torch.tensor(c, dtype=torch.int64) for g, sign, _, c in record["decided"] if c is not None})
    return streaming.FinalStats(torch.tensor(record["mask_counts"], dtype=torch.int64), record["nonzero"],
                                record["entries"], signs, decided)


def worker_memory_bytes(job: MergeJob, shard: ShardSpec) -> int:
    """What one shard worker needs: the reader's stacked chunks for N models (float32 at worst:
    fine-tunes in other dtypes than the base are read upcast), the fused kernels' per-chunk
    outputs and sums (the packed masks are N / 8 bytes per entry), eager blocks (bounded by
    ``EAGER_BLOCK_ENTRIES`` across models), and the interpreter and torch. The working set is
    bounded by a chunk, not by the shard."""
    largest = max((c.numel for c in shard.chunks), default=0)
    n = len(job.model_ids)
    stacked = StoreChunkReader.RING * (n + 1) * 4
    kernels = 4 * 7 + n / 8  # tau*, the signed sums and counts, the zero-sum map; packed masks
    return int(largest * (stacked + kernels) + EAGER_BLOCK_ENTRIES * 4 * 6 + (1 << 30))


def run_shard_pass(job: MergeJob, shard: ShardSpec, request: streaming.PassRequest,
                   progress: Callable[[int], None] | None = None):
    """One pass over one shard in this process (the unit of work of every backend)."""
    return ShardWorker(job, shard).run(request, progress)
