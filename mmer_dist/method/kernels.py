"""Per-chunk work of each streaming pass, as compositions of the step functions.

A chunk is a row block of one tensor, read for all N models at once: ``models`` (N, rows, cols)
in the checkpoint dtype and ``base`` (rows, cols). Every function here is elementwise across the
parameter axes (the only reductions are integer counts and the sums over models, in model order),
so results do not depend on how a tensor is cut into chunks.

``ChunkKernels`` optionally wraps the hot functions in ``torch.compile``: on CPU the eager form
makes one N x chunk temporary per op, the fused form streams once. Compiled and eager results
are identical (tests check it). Nothing here loops over the models in Python while traced for a
CPU kernel (``task_vectors.model_sum`` is then one reduction), so a kernel compiled ahead of time
takes the number of models as a run-time size: one compile serves every N.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmer_dist.method import baselines, neuro, select
from mmer_dist.method.elect import SignedSums, decided_by_majority, disjoint_mean, elect_sign, signed_sums
from mmer_dist.method.masks import compute_masks, pack_bits, unpack_bits
from mmer_dist.method.neuro import check_neuron_rank
from mmer_dist.method.settings import MergeSettings
from mmer_dist.method.task_vectors import model_sum, task_vectors
from mmer_dist.method.trim import trim

# The most models a fused kernel takes; more run eagerly. Up to here inductor sums over the models
# one by one (past 4096 terms it would sum in a cascade, another order than model_sum's).
FUSED_MAX_MODELS = 4096


@dataclass(frozen=True)
class ChunkInfo:
    """Where a chunk sits: its tensor, selection group and the flat index of its first entry."""

    tensor: str
    group: str
    flat_offset: int
    ndim: int = 2


def prepared_task_vectors(models: torch.Tensor, base: torch.Tensor, settings: MergeSettings,
                          model_keys: tuple[int, ...], tensor_key: int, flat_offset: torch.Tensor) -> torch.Tensor:
    """tau_i in float32, with DARE applied when the settings ask for it."""
    tau = task_vectors(models, base)
    if settings.dare_rate > 0.0:
        tau = baselines.dare(tau, settings.dare_rate, settings.dare_seed, model_keys, tensor_key, flat_offset)
    return tau


def merge_step(settings: MergeSettings, tau: torch.Tensor, thresholds: torch.Tensor, majority: torch.Tensor,
               base: torch.Tensor, ndim: int = 2) -> tuple[torch.Tensor, SignedSums | None]:
    """tau* of one chunk for the settings' merge method (``base`` rows: NeuroMerging's w), and the
    sums its per-parameter sign election read (None for a step that elects none)."""
    if settings.method == "ties" or (settings.method == "neuro" and ndim <= 1):
        sums = signed_sums(trim(tau, thresholds))
        return disjoint_mean(sums, elect_sign(sums, majority)), sums
    if settings.method == "neuro":
        return neuro.neuro_merge_rows(trim(tau, thresholds), base, energy=settings.neuro_energy,
                                      keep_parallel=settings.neuro_keep_parallel), None
    if settings.method == "ta":
        return baselines.task_arithmetic_sum(tau), None
    if settings.method == "naive":
        return baselines.naive_mean(tau), None
    raise ValueError(f"no chunk kernel for merge method {settings.method!r}")


def sign_tally(sums: SignedSums | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive sums, negative sums, sums of exactly 0 that the majority decided) int64 (3,), and
    the map of the last, bool like ``like``; zeros for a step that elects no sign."""
    if sums is None:
        return torch.zeros(3, dtype=torch.int64, device=like.device), torch.zeros_like(like, dtype=torch.bool)
    decided = decided_by_majority(sums)
    return torch.stack([(sums.total > 0).sum(), (sums.total < 0).sum(), decided.sum()]), decided


def merged_chunk(models, base, thresholds, majority, flat_offset, *, settings, model_keys, tensor_key, ndim=2):
    """tau* (rows, cols) float32, its nonzero and non-finite entry counts (0-d), the
    ``sign_tally`` (3,) and the map of the entries the majority decided, packed like a mask (rows,
    ceil(cols/8)): one sweep over the models, the statistics out of the same fused loop."""
    tau = prepared_task_vectors(models, base, settings, model_keys, tensor_key, flat_offset)
    return _merged(tau, base, thresholds, majority, settings, ndim)


def mask_chunk(models, base, tau_star, lams, flat_offset, *, settings, model_keys, tensor_key):
    """Packed masks (N, rows, ceil(cols/8)) uint8 of the models against tau*, and their set bits
    per model (N,). Per model, so a merge of many models takes them a group at a time."""
    tau = prepared_task_vectors(models, base, settings, model_keys, tensor_key, flat_offset)
    return _masks(tau, tau_star, lams, settings)


def final_chunk(models, base, thresholds, majority, lams, flat_offset, *, settings, model_keys, tensor_key, ndim=2):
    """``merged_chunk`` and ``mask_chunk`` in one: tau*, packed masks, set bits per model, tau*'s
    nonzero and non-finite counts, the sign tally and the zero-sum map."""
    tau = prepared_task_vectors(models, base, settings, model_keys, tensor_key, flat_offset)
    tau_star, nonzero, nonfinite, tally, decided = _merged(tau, base, thresholds, majority, settings, ndim)
    packed, counts = _masks(tau, tau_star, lams, settings)
    return tau_star, packed, counts, nonzero, nonfinite, tally, decided


def _merged(tau, base, thresholds, majority, settings, ndim):
    tau_star, sums = merge_step(settings, tau, thresholds, majority, base, ndim)
    tally, decided = sign_tally(sums, tau_star)
    return tau_star, (tau_star != 0).sum(), (~torch.isfinite(tau_star)).sum(), tally, pack_bits(decided)


def _masks(tau, tau_star, lams, settings):
    masks = compute_masks(settings.mask_rule, tau, tau_star, lams)
    return pack_bits(masks), masks.reshape(masks.shape[0], -1).sum(-1)


def majority_alternative(models, base, thresholds, majority, lams, entries, *, settings, ndim=2):
    """At ``entries`` (flat indices into the chunk, where the majority decided): tau* (k,) and the
    masks (N, k) under the other majority sign, and the change of each model's set mask bits
    (N,) int64 from this majority's to the other's.

    Eager on those entries only: every step is elementwise in the parameters, so the values are
    what the whole chunk's kernel gives there. (No DARE: its drops are keyed by position, and a
    version whose majority is assumed is never a DARE merge.)"""
    if settings.dare_rate > 0.0:
        raise ValueError("an assumed majority sign is never checked under DARE")
    n = models.shape[0]
    sub_base = base.reshape(1, -1)[:, entries]
    tau = task_vectors(models.reshape(n, 1, -1)[:, :, entries], sub_base)
    counted = []
    for sign in (majority, -majority):
        tau_star, _ = merge_step(settings, tau, thresholds, sign, sub_base, ndim)
        masks = compute_masks(settings.mask_rule, tau, tau_star, lams)
        counted.append((tau_star, masks))
    (_, old), (tau_star, masks) = counted
    change = masks.reshape(n, -1).sum(-1) - old.reshape(n, -1).sum(-1)
    return tau_star.reshape(-1), masks.reshape(n, -1), change


def high_key_chunk(models, base, flat_offset, *, settings, model_keys, tensor_key):
    """``select.high_digit_keys`` of the chunk's task vectors (fused: no N x chunk temporaries)."""
    return select.high_digit_keys(prepared_task_vectors(models, base, settings, model_keys, tensor_key, flat_offset))


def sign_count_chunk(models, base, lower, upper, flat_offset, *, settings, model_keys, tensor_key):
    """(positive, negative, undecided) elected-sign counts of one chunk, int64 (3,).

    Trim status is read from bit bounds: kept if bits >= upper, undecided in [lower, upper).
    A parameter with any undecided model is counted as undecided. The sums are ``model_sum``'s.
    """
    tau = prepared_task_vectors(models, base, settings, model_keys, tensor_key, flat_offset)
    bits = tau.abs().view(torch.int32)
    lower, upper = (b.reshape((-1,) + (1,) * (tau.dim() - 1)) for b in (lower, upper))
    total = model_sum(torch.where(bits >= upper, tau, torch.zeros((), dtype=tau.dtype, device=tau.device)))
    decided = ~((bits >= lower) & (bits < upper)).any(0)
    return torch.stack([((total > 0) & decided).sum(), ((total < 0) & decided).sum(), (~decided).sum()])


# Dynamic axes of each kernel's tensor arguments, for a ``fuse`` strategy that compiles ahead of
# time: (N, rows, cols) models, (rows, cols) base, then per-model vectors (N,) and scalars. The
# number of models is one of them: a kernel serves every N.
_CHUNK_DIMS = ({0: "models", 1: "rows", 2: "cols"}, {0: "rows", 1: "cols"})
_PER_MODEL = {0: "models"}
MERGED_DIMS = _CHUNK_DIMS + (_PER_MODEL, {}, {})  # thresholds, majority (), offset ()
MASK_DIMS = _CHUNK_DIMS + ({0: "rows", 1: "cols"}, _PER_MODEL, {})  # tau* (rows, cols), lams, offset ()
SIGN_DIMS = _CHUNK_DIMS + (_PER_MODEL, _PER_MODEL, {})  # lower, upper, offset ()
TASK_DIMS = _CHUNK_DIMS + ({},)  # offset ()
# Entries (over all models) of the row blocks eager kernels run on: their temporaries are
# N x block, so blocks shrink as N grows and memory stays the same.
EAGER_BLOCK_ENTRIES = 1 << 23
# Entries (over the models of one call) the fused mask kernel takes at once: it writes each
# model's mask out as bytes before packing them (packing fused into the mask loop ran 3x slower),
# so a chunk's masks are made a group of models at a time and that buffer stays 32 MB at any N.
MASK_GROUP_ENTRIES = 1 << 25


def _task_vectors_only(models, base, flat_offset, *, settings, model_keys, tensor_key):
    """``prepared_task_vectors`` with a tuple result (what an exported graph returns)."""
    return (prepared_task_vectors(models, base, settings, model_keys, tensor_key, flat_offset),)


def _high_keys_only(models, base, flat_offset, *, settings, model_keys, tensor_key):
    return (high_key_chunk(models, base, flat_offset, settings=settings, model_keys=model_keys, tensor_key=tensor_key),)


class ChunkKernels:
    """The kernels of one merge, bound to its settings and models: eager, ``torch.compile``d
    (``compile=True``), or built by a ``fuse`` strategy.

    ``fuse(name, fn, consts, tag, dims)`` returns a callable taking only the tensors (``consts``
    are bound; ``tag`` names them; ``dims`` the dynamic axes, the number of models among them), e.g.
    kernels compiled ahead of time and cached on disk (``mmer_dist.merge.kernel_cache``). It serves
    kernels whose constants are the same for every chunk and every model: not DARE (its seed
    depends on the tensor and the model) nor NeuroMerging's final step (per-row
    eigendecompositions); chunks whose width is no multiple of ``fuse_cols_multiple`` run eagerly.
    """

    def __init__(self, settings: MergeSettings, model_ids: list[str], compile: bool = False,
                 fuse: Callable | None = None, fuse_cols_multiple: int = 8):
        self.settings = settings.validated(list(model_ids))
        self.model_ids = list(model_ids)
        self.model_keys = tuple(baselines.stable_key(m) for m in model_ids)
        self._final = final_chunk
        self._signs = sign_count_chunk
        self._prepare = prepared_task_vectors
        self._high_keys = high_key_chunk
        self._fused: dict[str, Callable] = {}
        self._fuse_cols_multiple = fuse_cols_multiple
        if fuse is not None and settings.dare_rate == 0.0 and len(model_ids) <= FUSED_MAX_MODELS:
            # nothing model-specific is bound: one kernel serves every model set and every N
            consts = dict(settings=settings.with_lams(()), model_keys=(), tensor_key=0)
            tag = f"{settings.method}|{settings.mask_rule}"
            if settings.method != "neuro":
                self._fused["merged"] = fuse("merged", merged_chunk, {**consts, "ndim": 2}, tag, MERGED_DIMS)
                self._fused["masks"] = fuse("masks", mask_chunk, consts, tag, MASK_DIMS)
            self._fused["signs"] = fuse("signs", sign_count_chunk, consts, tag, SIGN_DIMS)
            self._fused["tau"] = fuse("tau", _task_vectors_only, consts, tag, TASK_DIMS)
            self._fused["high"] = fuse("high", _high_keys_only, consts, tag, TASK_DIMS)
        elif compile:
            # dynamic from the start: chunk shapes vary by tensor, one graph serves them all
            fuse_ = functools.partial(torch.compile, dynamic=True)
            # NeuroMerging's per-row eigendecomposition does not fuse; its final pass stays eager
            if settings.method != "neuro":
                self._final = fuse_(final_chunk)
            self._signs = fuse_(sign_count_chunk)
            self._prepare = fuse_(prepared_task_vectors)
            self._high_keys = fuse_(high_key_chunk)

    def _fused_for(self, name: str, models: torch.Tensor) -> Callable | None:
        return self._fused.get(name) if self._fusable(models.shape[-1]) else None

    def _fusable(self, cols: int) -> bool:
        """Whether chunks this wide take the ahead-of-time kernels (the others run eagerly)."""
        multiple = self._fuse_cols_multiple
        return cols >= 2 * multiple and cols % multiple == 0

    def block_elems(self, cols: int, default: int) -> int:
        """Entries per model of the row blocks a chunk of width ``cols`` is computed in. Kernels
        compiled ahead of time stream (no N x block temporaries) and take contiguous inputs, so
        they get whole chunks: a row block of a stacked chunk is a strided view they would first
        copy (a third of a second per 100M parameters), and a 4M-entry block runs within ~6% of
        a 1M one. Eager kernels make N x block temporaries: ``default``-sized blocks, smaller
        where N x block would pass ``EAGER_BLOCK_ENTRIES``."""
        if "merged" in self._fused and self._fusable(cols):
            return 1 << 62
        return min(default, max(1, EAGER_BLOCK_ENTRIES // len(self.model_ids)))

    def _offset(self, info: ChunkInfo, device) -> torch.Tensor:
        return torch.tensor(info.flat_offset, dtype=torch.int64, device=device)

    def task_vectors(self, models, base, info: ChunkInfo) -> torch.Tensor:
        if (fused := self._fused_for("tau", models)) is not None:
            return fused(models, base, self._offset(info, models.device))[0]
        return self._prepare(models, base, self.settings, self.model_keys,
                             baselines.stable_key(info.tensor), self._offset(info, models.device))

    def high_keys(self, models, base, info: ChunkInfo) -> torch.Tensor:
        """``select.high_digit_keys`` of the chunk's task vectors, int32 (N, n)."""
        if (fused := self._fused_for("high", models)) is not None:
            return fused(models, base, self._offset(info, models.device))[0]
        return self._high_keys(models, base, self._offset(info, models.device), settings=self.settings,
                               model_keys=self.model_keys, tensor_key=baselines.stable_key(info.tensor))

    def high_counts(self, models, base, info: ChunkInfo) -> select.SparseCounts:
        return select.counts_from_high_keys(self.high_keys(models, base, info))

    def low_counts(self, models, base, info: ChunkInfo, lower, upper) -> select.SparseCounts:
        return select.low_digit_counts(self.task_vectors(models, base, info), lower, upper)

    def sign_counts(self, models, base, info: ChunkInfo, lower, upper) -> torch.Tensor:
        if self.settings.method == "neuro" and info.ndim > 1:
            # NeuroMerging elects per singular direction, not per parameter: only its 1-D
            # weights use (and so vote on) the majority sign
            return torch.zeros(3, dtype=torch.int64)
        dev = models.device
        lower, upper = lower.to(dev, torch.int32), upper.to(dev, torch.int32)
        if (fused := self._fused_for("signs", models)) is not None:
            return fused(models, base, lower, upper, self._offset(info, dev))[0].cpu()
        return self._signs(models, base, lower, upper, self._offset(info, dev),
                           settings=self.settings, model_keys=self.model_keys,
                           tensor_key=baselines.stable_key(info.tensor)).cpu()

    def final(self, models, base, info: ChunkInfo, thresholds, majority, lams):
        """``final_chunk``'s seven results for one block."""
        if self.settings.method == "neuro":
            check_neuron_rank(info.tensor, info.ndim)
        dev = models.device
        thresholds, lams = thresholds.to(dev), lams.to(dev)
        majority, offset = torch.tensor(majority, dtype=torch.float32, device=dev), self._offset(info, dev)
        if (merged := self._fused_for("merged", models)) is not None:
            tau_star, nonzero, nonfinite, tally, decided = merged(models, base, thresholds, majority, offset)
            group = max(1, MASK_GROUP_ENTRIES // max(1, tau_star.numel()))
            parts = [self._fused["masks"](models[a:a + group], base, tau_star, lams[a:a + group], offset)
                     for a in range(0, models.shape[0], group)]
            packed = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
            counts = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
            return tau_star, packed, counts, nonzero, nonfinite, tally, decided
        return self._final(models, base, thresholds, majority, lams, offset, settings=self.settings,
                           model_keys=self.model_keys, tensor_key=baselines.stable_key(info.tensor), ndim=info.ndim)

    def majority_alternative(self, models, base, info: ChunkInfo, thresholds, majority, lams, decided_map):
        """Where ``final``'s packed map says the majority decided: (flat entries of the block,
        int64 (k,); tau* (k,), masks (N, k) and set-bit changes (N,) under the other majority)."""
        entries = unpack_bits(decided_map, models.shape[-1]).reshape(-1).nonzero().squeeze(1)
        dev = models.device
        alternative = majority_alternative(models, base, thresholds.to(dev), majority, lams.to(dev), entries.to(dev),
                                           settings=self.settings, ndim=info.ndim)
        return (entries.cpu(), *(t.cpu() for t in alternative))
