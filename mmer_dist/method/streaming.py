"""The streaming MMER merge: passes over aligned chunks, partial results, and the driver.

Memory is bounded by one chunk of N models: no pass ever holds a whole tensor or model. The
work splits into passes whose partial results merge associatively, so a backend may run a pass
over any split of the chunks (one process, or one Ray actor per shard) and combine partials:

1. ``HighPass``  high-digit |tau| histograms, only when not cached (the store caches them at
   ingest; DARE changes tau, so it forces this pass).
2. ``LowPass``   low-digit histograms of the still-open threshold bins, and the elected-sign
   counts of every parameter whose trim is already settled.
3. ``SignPass``  elected-sign counts with exact thresholds, only when (2) left a majority sign
   undecided.
4. ``FinalPass`` tau*, masks (bit-packed) and mask counts, written through a ``ChunkWriter``.
5. ``ZeroSumPass`` only after a final pass that assumed a majority sign (a version derived from
   another) and counted a different one: it rewrites the entries the majority decided (trimmed
   sum exactly 0) with the values the final pass kept for the other sign. It reads no model.

``MergeDriver`` decides which pass comes next from the combined partials; it never touches
data. ``run_pass`` does one pass over a list of chunks; local and Ray backends both call it.
Oracle for the whole: ``reference.reference_merge``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mmer_dist.errors import InvalidInputError
from mmer_dist.method import select, validate
from mmer_dist.method.elect import SignCounts
from mmer_dist.method.kernels import ChunkInfo, ChunkKernels
from mmer_dist.method.settings import MergeSettings
from mmer_dist.method.trim import selection_group


@dataclass(frozen=True)
class ChunkSpec:
    """A row block [row_start, row_stop) of a tensor viewed as (rows, cols); ``ndim`` is the
    tensor's own rank (1-D tensors are one row; per-neuron methods need to tell them apart)."""

    tensor: str
    index: int
    row_start: int
    row_stop: int
    cols: int
    ndim: int = 2

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def info(self, scope: str) -> ChunkInfo:
        return ChunkInfo(self.tensor, selection_group(self.tensor, scope), self.row_start * self.cols, self.ndim)


class ChunkReader(Protocol):
    def read(self, chunk: ChunkSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(models (N, rows, cols), base (rows, cols)), any floating dtypes."""


@dataclass(frozen=True)
class MajorityAlternative:
    """The entries of one chunk that the majority sign decided (flat indices into (rows, cols)),
    with tau* (k,) float32 and the masks (N, k) bool they take under majority sign ``sign``."""

    sign: float
    entries: torch.Tensor
    tau_star: torch.Tensor
    masks: torch.Tensor


class ChunkWriter(Protocol):
    def write(self, chunk: ChunkSpec, tau_star: torch.Tensor, packed_masks: torch.Tensor) -> None:
        """tau_star (rows, cols) float32, packed_masks (N, rows, ceil(cols/8)) uint8."""

    def keep_alternative(self, chunk: ChunkSpec, alternative: MajorityAlternative) -> None:
        """Keep (beside the written chunk, until the merge ends) its values under the other majority."""

    def apply_alternative(self, chunk: ChunkSpec, sign: float) -> int:
        """Rewrite the chunk's entries with the kept alternative if it is for majority ``sign``;
        returns the entries rewritten (0 if none is kept, or it is for the other sign)."""


# -- partial results (merge associatively across any split of the chunks) -----------------------


@dataclass(frozen=True)
class MajorityDecided:
    """The entries whose trimmed sum is exactly 0, so that the majority sign chose their tau* and
    masks (``elect.decided_by_majority``), per (selection group, majority sign the pass used): how
    many, and, where the pass also computed the other sign's values, how each model's count of set
    mask bits changes under that sign. Keyed by the sign used, so that partials of one merge
    computed under different signs (a resumed merge) still add up."""

    entries: Mapping[tuple[str, float], int] = field(default_factory=dict)
    changes: Mapping[tuple[str, float], torch.Tensor] = field(default_factory=dict)

    def merge(self, other: MajorityDecided) -> MajorityDecided:
        entries, changes = dict(self.entries), dict(self.changes)
        for k, v in other.entries.items():
            entries[k] = entries.get(k, 0) + v
        for k, v in other.changes.items():
            changes[k] = changes[k] + v if k in changes else v
        return MajorityDecided(entries, changes)

    def stale_groups(self, majority: Mapping[str, float]) -> list[str]:
        """Groups with entries written under another sign than ``majority``'s."""
        return sorted({g for (g, sign), n in self.entries.items() if n and sign != majority[g]})

    def mask_change(self, majority: Mapping[str, float], n_models: int) -> torch.Tensor:
        """How the set mask bits per model change once the stale entries take ``majority``."""
        total = torch.zeros(n_models, dtype=torch.int64)
        for g in self.stale_groups(majority):
            key = (g, -majority[g])
            if key not in self.changes:
                raise RuntimeError(f"group {g!r} was written under majority sign {-majority[g]:+g} and its "
                                   "values under the other sign were not kept")
            total += self.changes[key]
        return total

    def per_group(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (g, _), n in self.entries.items():
            out[g] = out.get(g, 0) + n
        return out


@dataclass(frozen=True)
class FinalStats:
    """Totals of the final pass: set mask bits per model, nonzero tau* entries, entries, the
    entries the majority sign decided, and (when it checks a majority sign it was given) the
    elected-sign counts."""

    mask_counts: torch.Tensor
    nonzero: int = 0
    entries: int = 0
    signs: SignCounts | None = None
    decided: MajorityDecided = field(default_factory=MajorityDecided)

    def merge(self, other: FinalStats) -> FinalStats:
        signs = self.signs.merge(other.signs) if self.signs is not None and other.signs is not None else \
            (self.signs or other.signs)
        return FinalStats(self.mask_counts + other.mask_counts, self.nonzero + other.nonzero,
                          self.entries + other.entries, signs, self.decided.merge(other.decided))


@dataclass(frozen=True)
class Rewritten:
    """What a ``ZeroSumPass`` did: entries rewritten."""

    entries: int = 0

    def merge(self, other: Rewritten) -> Rewritten:
        return Rewritten(self.entries + other.entries)


@dataclass(frozen=True)
class LowPassResult:
    histogram: select.GroupHistogram
    signs: SignCounts

    def merge(self, other: LowPassResult) -> LowPassResult:
        return LowPassResult(self.histogram.merge(other.histogram), self.signs.merge(other.signs))


PassResult = select.GroupHistogram | LowPassResult | SignCounts | FinalStats | Rewritten


def merge_results(results: Iterable[PassResult]) -> PassResult:
    results = list(results)
    out = results[0]
    for r in results[1:]:
        out = out.merge(r)
    return out


@dataclass(frozen=True)
class Block:
    """One kernel-sized row block of a chunk: where it sits, and its models / base rows."""

    info: ChunkInfo
    models: torch.Tensor
    base: torch.Tensor


@dataclass(frozen=True)
class ChunkWork:
    """What a pass step gets for one chunk: the chunk, its selection group, its blocks, the
    whole chunk's tensors (for error reports) and where the final pass writes."""

    chunk: ChunkSpec
    group: str
    blocks: list[Block]
    models: torch.Tensor
    base: torch.Tensor
    writer: ChunkWriter | None
    lams: torch.Tensor


# -- the passes: each is small and picklable (it travels to Ray actors), knows its per-chunk step,
# the empty partial it starts from, and how the driver takes its combined result ---------------


@dataclass(frozen=True)
class HighPass:
    """High-digit |tau| histograms (only when the store has none cached, or with DARE)."""

    writes = False  # a final pass: writes the version, marks shards done
    rewrites = False  # rewrites what a final pass wrote

    def start(self, n_models: int) -> select.GroupHistogram:
        return select.GroupHistogram()

    def step(self, partial: select.GroupHistogram, kernels: ChunkKernels, work: ChunkWork) -> select.GroupHistogram:
        for blk in work.blocks:
            counts = kernels.high_counts(blk.models, blk.base, blk.info)
            if counts.keys.numel() and int(counts.keys[-1]) >= select.NONFINITE_HIGH:
                _raise_nonfinite(work.models, work.base, work.chunk, kernels)
            partial = partial.add(work.group, counts)
        return partial

    def advance(self, driver: MergeDriver, result: select.GroupHistogram) -> None:
        driver.bounds = select.locate_high(result, driver.sizes, driver.settings.topk)


@dataclass(frozen=True)
class LowPass:
    """Low-digit histograms of the still-open threshold bins, and the elected-sign counts of
    every parameter whose trim is already settled."""

    bounds: select.TrimBounds
    writes = False
    rewrites = False

    def start(self, n_models: int) -> LowPassResult:
        return LowPassResult(select.GroupHistogram(), SignCounts())

    def step(self, partial: LowPassResult, kernels: ChunkKernels, work: ChunkWork) -> LowPassResult:
        lower, upper = self.bounds.lower[work.group], self.bounds.upper[work.group]
        hist, signs = partial.histogram, partial.signs
        for blk in work.blocks:
            if bool((lower != upper).any()):
                hist = hist.add(work.group, kernels.low_counts(blk.models, blk.base, blk.info, lower, upper))
            signs = signs.merge(SignCounts({work.group: kernels.sign_counts(blk.models, blk.base, blk.info, lower, upper)}))
        return LowPassResult(hist, signs)

    def advance(self, driver: MergeDriver, result: LowPassResult) -> None:
        if not driver.bounds.is_exact():
            driver.bounds = select.refine_low(driver.bounds, result.histogram)
        driver.take_signs(result.signs)


@dataclass(frozen=True)
class SignPass:
    """Elected-sign counts with exact thresholds, when the LowPass left a majority undecided."""

    bounds: select.TrimBounds
    writes = False
    rewrites = False

    def start(self, n_models: int) -> SignCounts:
        return SignCounts()

    def step(self, partial: SignCounts, kernels: ChunkKernels, work: ChunkWork) -> SignCounts:
        lower, upper = self.bounds.lower[work.group], self.bounds.upper[work.group]
        for blk in work.blocks:
            partial = partial.merge(SignCounts({work.group: kernels.sign_counts(blk.models, blk.base, blk.info,
                                                                                lower, upper)}))
        return partial

    def advance(self, driver: MergeDriver, result: SignCounts) -> None:
        driver.take_signs(result)


@dataclass(frozen=True)
class FinalPass:
    """tau*, the bit-packed masks (through the writer) and their counts. With ``check`` (the
    majority was assumed, not counted: a version derived from another), it also counts elected
    signs, and keeps, for the entries the majority decided, their values under the other sign
    (``ChunkWriter.keep_alternative``): if the count disagrees, a ``ZeroSumPass`` puts those in
    place instead of a second final pass."""

    thresholds: Mapping[str, torch.Tensor]
    majority: Mapping[str, float]
    check: bool = False
    writes = True
    rewrites = False

    def start(self, n_models: int) -> FinalStats:
        return FinalStats(torch.zeros(n_models, dtype=torch.int64), signs=SignCounts() if self.check else None)

    def step(self, partial: FinalStats, kernels: ChunkKernels, work: ChunkWork) -> FinalStats:
        g, majority = work.group, self.majority[work.group]
        outs = [kernels.final(blk.models, blk.base, blk.info, self.thresholds[g], majority, work.lams)
                for blk in work.blocks]
        tau_star = torch.cat([o[0] for o in outs]) if len(outs) > 1 else outs[0][0]
        packed = torch.cat([o[1] for o in outs], dim=1) if len(outs) > 1 else outs[0][1]
        if sum(int(o[4]) for o in outs):
            _raise_nonfinite(work.models, work.base, work.chunk, kernels)
        if work.writer is not None:
            work.writer.write(work.chunk, tau_star.cpu(), packed.cpu())
        counts = sum(o[2].cpu().to(torch.int64) for o in outs)
        tally = sum(o[5].cpu() for o in outs)
        decided = MajorityDecided({(g, majority): int(tally[2])})
        signs = None
        if self.check:
            signs = SignCounts({g: torch.stack([tally[0], tally[1], torch.zeros_like(tally[2])])})
            if int(tally[2]):
                decided = MajorityDecided(decided.entries, {(g, majority): self._keep_alternative(kernels, work, outs)})
        return partial.merge(FinalStats(counts, sum(int(o[3]) for o in outs), work.chunk.numel, signs, decided))

    def _keep_alternative(self, kernels: ChunkKernels, work: ChunkWork, outs) -> torch.Tensor:
        """Hands the chunk's values under the other majority sign to the writer; returns how each
        model's set mask bits change under it."""
        g = work.group
        parts = [(blk, kernels.majority_alternative(blk.models, blk.base, blk.info, self.thresholds[g],
                                                    self.majority[g], work.lams, o[6]))
                 for blk, o in zip(work.blocks, outs) if int(o[5][2])]
        chunk_start = work.chunk.row_start * work.chunk.cols
        alternative = MajorityAlternative(
            -self.majority[g], torch.cat([e + (blk.info.flat_offset - chunk_start) for blk, (e, *_) in parts]),
            torch.cat([p[1] for _, p in parts]), torch.cat([p[2] for _, p in parts], dim=1))
        if work.writer is None:
            raise RuntimeError("a final pass that checks its majority sign needs a writer to keep the alternative")
        work.writer.keep_alternative(work.chunk, alternative)
        return sum(p[3] for _, p in parts)

    def advance(self, driver: MergeDriver, result: FinalStats) -> None:
        driver.finish(result)


@dataclass(frozen=True)
class ZeroSumPass:
    """After a checked final pass whose majority sign was wrong for ``groups``: the entries of
    those groups that the majority decided take the values kept for the counted sign. Reads no
    model; idempotent (the kept values are absolute), so a resumed merge may run it again."""

    groups: tuple[str, ...]
    majority: Mapping[str, float]
    writes = False
    rewrites = True

    def start(self, n_models: int) -> Rewritten:
        return Rewritten()

    def rewrite(self, chunks: Sequence[ChunkSpec], writer: ChunkWriter, scope: str,
                progress: Callable[[int], None] | None = None) -> Rewritten:
        done = 0
        for chunk in chunks:
            g = chunk.info(scope).group
            if g in self.groups:
                done += writer.apply_alternative(chunk, self.majority[g])
            if progress is not None:
                progress(chunk.numel)
        return Rewritten(done)

    def advance(self, driver: MergeDriver, result: Rewritten) -> None:
        driver.rewritten(result)


PassRequest = HighPass | LowPass | SignPass | FinalPass | ZeroSumPass


# -- one pass over a list of chunks ------------------------------------------------------------


DEFAULT_BLOCK_ELEMS = 1 << 20  # per model; a fused kernel's N inputs + outputs stay in L2/L3


def row_blocks(chunk: ChunkSpec, block_elems: int) -> list[tuple[ChunkSpec, int, int]]:
    """Split a chunk into row blocks of at most ``block_elems`` entries: (sub-chunk, start, stop)
    with start/stop relative to the chunk. Storage chunks stay large (few objects, big reads);
    kernels run on blocks small enough to stay in cache (measured ~2x faster at 1M than 4M)."""
    rows = max(1, block_elems // max(1, chunk.cols))
    return [(ChunkSpec(chunk.tensor, chunk.index, chunk.row_start + a, chunk.row_start + min(chunk.rows, a + rows),
                       chunk.cols, chunk.ndim), a, min(chunk.rows, a + rows))
            for a in range(0, chunk.rows, rows)]


def run_pass(request: PassRequest, chunks: Sequence[ChunkSpec], reader: ChunkReader, kernels: ChunkKernels,
             *, writer: ChunkWriter | None = None, device: str | torch.device = "cpu",
             progress: Callable[[int], None] | None = None, block_elems: int = DEFAULT_BLOCK_ELEMS) -> PassResult:
    """Do one pass over ``chunks``, returning this split's partial result."""
    settings = kernels.settings
    if isinstance(request, ZeroSumPass):  # reads no model: it rewrites what the final pass wrote
        return request.rewrite(chunks, writer, settings.scope, progress)
    # float64 so that 0.5 * lam_i is rounded to float32 once, as on the reference path
    lams = torch.tensor(settings.lams, dtype=torch.float64)
    partial = request.start(len(kernels.model_keys))
    for chunk in chunks:
        models, base = reader.read(chunk)
        models, base = models.to(device), base.to(device)
        blocks = [Block(sub.info(settings.scope), models[:, a:b], base[a:b])
                  for sub, a, b in row_blocks(chunk, kernels.block_elems(chunk.cols, block_elems))]
        work = ChunkWork(chunk, chunk.info(settings.scope).group, blocks, models, base, writer, lams)
        partial = request.step(partial, kernels, work)
        if progress is not None:
            progress(chunk.numel)
    return partial


def _raise_nonfinite(models: torch.Tensor, base: torch.Tensor, chunk: ChunkSpec, kernels: ChunkKernels) -> None:
    """Name the model and tensor behind a non-finite value seen in a chunk (an error path only).

    Cheap detection happens in the passes (high-digit keys of Inf/NaN, a non-finite tau*); this
    rescans the chunk to say where. Ingest rejects non-finite checkpoints before any merge.
    """
    offset = chunk.row_start * chunk.cols
    validate.check_finite(base, "base", chunk.tensor, offset=offset)
    for model_id, m in zip(kernels.model_ids, models):
        validate.check_finite(m, model_id, chunk.tensor, offset=offset)
    tau = kernels.task_vectors(models, base, chunk.info(kernels.settings.scope))
    for model_id, t in zip(kernels.model_ids, tau):
        validate.check_finite(t, model_id, f"{chunk.tensor} (task vector)", offset=offset)
    raise InvalidInputError(f"tensor {chunk.tensor!r}: the merged task vector overflows float32 "
                            f"in rows [{chunk.row_start}, {chunk.row_stop})")


# -- the driver: which pass next, from combined partials ----------------------------------------


def group_sizes(tensor_sizes: Mapping[str, int], scope: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, numel in tensor_sizes.items():
        g = selection_group(name, scope)
        sizes[g] = sizes.get(g, 0) + numel
    return sizes


@dataclass
class MergeDriver:
    """Sequences the passes of one merge. Feed each pass's combined result to ``accept``.

    ``cached_high`` is a complete high-digit histogram per group when the store has one.
    """

    settings: MergeSettings
    tensor_sizes: Mapping[str, int]
    n_models: int
    cached_high: select.GroupHistogram | None = None
    bounds: select.TrimBounds | None = None
    majority: dict[str, float] | None = None
    stats: FinalStats | None = None
    passes_run: list[str] = field(default_factory=list)
    check_majority: bool = False  # the majority was assumed (restored): count signs to check it
    rewritten_entries: int = 0  # entries a ZeroSumPass rewrote for the counted majority sign

    def __post_init__(self):
        # the driver has no model ids; callers with ids validate first and get their names in messages
        self.settings.validated([f"#{i}" for i in range(self.n_models)])
        self.sizes = group_sizes(self.tensor_sizes, self.settings.scope)
        if not self.settings.trims:
            self.bounds = select.TrimBounds.keep_all(list(self.sizes), self.n_models)
        elif self.cached_high is not None and self.settings.dare_rate == 0.0:
            # the cache holds histograms of the raw tau_i; DARE changes tau, so it needs a HighPass
            self.bounds = select.locate_high(self.cached_high, self.sizes, self.settings.topk)
        if not self.settings.elects:
            self.majority = {g: 1.0 for g in self.sizes}
        self._pending_signs: SignCounts | None = None
        self._stale: FinalStats | None = None  # a final pass's totals, awaiting its ZeroSumPass

    def next_pass(self) -> PassRequest | None:
        if self.bounds is None:
            return HighPass()
        if self.majority is None or not self.bounds.is_exact():
            if self._pending_signs is None:
                return LowPass(self.bounds)
            return SignPass(self.bounds)
        if self.stats is None:
            if self._stale is not None:
                return ZeroSumPass(tuple(self._stale.decided.stale_groups(self.majority)), dict(self.majority))
            thresholds = {g: self.bounds.thresholds(g) for g in self.sizes}
            return FinalPass(thresholds, dict(self.majority), self.check_majority and self.settings.elects)
        return None

    def finish(self, stats: FinalStats) -> None:
        """The final pass's totals. When it checked an assumed majority sign, the counted one is the
        majority from now on; where entries that the majority decided were written under another
        sign (a wrong guess, or part of a resumed merge), a ``ZeroSumPass`` comes next. A wrong
        guess with no such entry changed nothing that was written."""
        if stats.signs is not None:
            self.majority = stats.signs.majority()
            self.check_majority = False
        if stats.decided.stale_groups(self.majority):
            self._stale = stats
        else:
            self.stats = stats

    def rewritten(self, result: Rewritten) -> None:
        stats, self._stale = self._stale, None
        self.rewritten_entries += result.entries
        change = stats.decided.mask_change(self.majority, self.n_models)
        self.stats = dataclasses.replace(stats, mask_counts=stats.mask_counts + change)

    def accept(self, result: PassResult) -> None:
        request = self.next_pass()
        self.passes_run.append(type(request).__name__)
        request.advance(self, result)

    def take_signs(self, signs: SignCounts) -> None:
        if self.majority is not None:
            return
        if signs.is_certain():
            self.majority = signs.majority()
        else:
            self._pending_signs = signs

    def thresholds(self) -> dict[str, torch.Tensor]:
        return {g: self.bounds.thresholds(g) for g in self.sizes}

    def decided_state(self) -> dict | None:
        """Thresholds (as float32 bit patterns) and majority signs once both are final, else None;
        JSON-able, so a resumed merge can skip straight to the final pass."""
        if self.majority is None or self.bounds is None or not self.bounds.is_exact():
            return None
        return {"threshold_bits": {g: self.bounds.upper[g].tolist() for g in self.sizes},
                "majority": dict(self.majority)}

    def restore(self, state: dict) -> None:
        bits = {g: torch.tensor(v, dtype=torch.int64) for g, v in state["threshold_bits"].items()}
        self.bounds = select.TrimBounds(bits, bits, {g: torch.zeros_like(v) for g, v in bits.items()})
        self.majority = {g: float(v) for g, v in state["majority"].items()}


def run_local(driver: MergeDriver, chunks: Sequence[ChunkSpec], reader: ChunkReader, kernels: ChunkKernels,
              writer: ChunkWriter | None = None, device: str | torch.device = "cpu",
              progress_factory: Callable[[str, int], Callable[[int], None]] | None = None,
              block_elems: int = DEFAULT_BLOCK_ELEMS) -> FinalStats:
    """Run every pass in this process over all chunks (the single-process backend)."""
    total = sum(c.numel for c in chunks)
    while (request := driver.next_pass()) is not None:
        progress = progress_factory(type(request).__name__, total) if progress_factory else None
        driver.accept(run_pass(request, chunks, reader, kernels, writer=writer, device=device, progress=progress,
                               block_elems=block_elems))
    return driver.stats
