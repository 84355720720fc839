"""Per-chunk work of each streaming pass, as compositions of the step functions.

A chunk is a row block of one tensor, read for all N models at once: ``models`` (N, rows, cols)
in the checkpoint dtype and ``base`` (rows, cols). Every function here is elementwise across the
parameter axes (the only reductions are integer counts), so results do not depend on how a
tensor is cut into chunks.

``ChunkKernels`` optionally wraps the hot functions in ``torch.compile``: on CPU the eager form
makes one N x chunk temporary per op, the fused form streams once. Compiled and eager results
are identical (tests check it); compilation costs seconds once per process and shape family.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmer_dist.method import baselines, neuro, select
from mmer_dist.method.elect import disjoint_mean, elect_sign
from mmer_dist.method.masks import compute_masks, pack_bits
from mmer_dist.method.neuro import check_neuron_rank
from mmer_dist.method.settings import MergeSettings
from mmer_dist.method.task_vectors import task_vectors
from mmer_dist.method.trim import trim


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
               base: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """tau* of one chunk for the settings' merge method (``base`` rows: NeuroMerging's w)."""
    if settings.method == "ties" or (settings.method == "neuro" and ndim <= 1):
        trimmed = trim(tau, thresholds)
        return disjoint_mean(trimmed, elect_sign(trimmed, majority))
    if settings.method == "neuro":
        return neuro.neuro_merge_rows(trim(tau, thresholds), base, energy=settings.neuro_energy,
                                      keep_parallel=settings.neuro_keep_parallel)
    if settings.method == "ta":
        return baselines.task_arithmetic_sum(tau)
    if settings.method == "naive":
        return baselines.naive_mean(tau)
    raise ValueError(f"no chunk kernel for merge method {settings.method!r}")


def final_chunk(models, base, thresholds, majority, lams, flat_offset, *, settings, model_keys, tensor_key, ndim=2):
    """tau* (rows, cols) float32, packed masks (N, rows, ceil(cols/8)) uint8, set bits per model
    (N,), and tau*'s nonzero and non-finite entry counts (0-d): the statistics come out of the
    same fused loop instead of two more passes over tau*."""
    tau = prepared_task_vectors(models, base, settings, model_keys, tensor_key, flat_offset)
    tau_star = merge_step(settings, tau, thresholds, majority, base, ndim)
    masks = compute_masks(settings.mask_rule, tau, tau_star, lams)
    counts = masks.reshape(masks.shape[0], -1).sum(-1)
    return tau_star, pack_bits(masks), counts, (tau_star != 0).sum(), (~torch.isfinite(tau_star)).sum()


def high_key_chunk(models, base, flat_offset, *, settings, model_keys, tensor_key):
    """``select.high_digit_keys`` of the chunk's task vectors (fused: no N x chunk temporaries)."""
    return select.high_digit_keys(prepared_task_vectors(models, base, settings, model_keys, tensor_key, flat_offset))


def sign_count_chunk(models, base, lower, upper, flat_offset, *, settings, model_keys, tensor_key):
    """(positive, negative, undecided) elected-sign counts of one chunk, int64 (3,).

    Trim status is read from bit bounds: kept if bits >= upper, undecided in [lower, upper).
    A parameter with any undecided model is counted as undecided. Model by model, in model
    order, so the sums are ``model_sum``'s and nothing N x chunk is materialised.
    """
    tau = prepared_task_vectors(models, base, settings, model_keys, tensor_key, flat_offset)
    zero = torch.zeros((), dtype=tau.dtype, device=tau.device)
    total = undecided = None
    for i in range(tau.shape[0]):
        bits = tau[i].abs().view(torch.int32)
        kept = torch.where(bits >= upper[i], tau[i], zero)
        open_ = (bits >= lower[i]) & (bits < upper[i])
        total = kept if total is None else total + kept
        undecided = open_ if undecided is None else undecided | open_
    decided = ~undecided
    return torch.stack([((total > 0) & decided).sum(), ((total < 0) & decided).sum(), undecided.sum()])


# Dynamic axes of each kernel's tensor arguments, for a ``fuse`` strategy that compiles ahead of
# time: (N, rows, cols) models, (rows, cols) base, then per-model vectors and scalars (static).
_CHUNK_DIMS = ({1: "rows", 2: "cols"}, {0: "rows", 1: "cols"})
FINAL_DIMS = _CHUNK_DIMS + ({}, {}, {}, {})  # thresholds (N,), majority (), lams (N,), offset ()
SIGN_DIMS = _CHUNK_DIMS + ({}, {}, {})  # lower (N,), upper (N,), offset ()
TASK_DIMS = _CHUNK_DIMS + ({},)  # offset ()


def _task_vectors_only(models, base, flat_offset, *, settings, model_keys, tensor_key):
    """``prepared_task_vectors`` with a tuple result (what an exported graph returns)."""
    return (prepared_task_vectors(models, base, settings, model_keys, tensor_key, flat_offset),)


def _high_keys_only(models, base, flat_offset, *, settings, model_keys, tensor_key):
    return (high_key_chunk(models, base, flat_offset, settings=settings, model_keys=model_keys, tensor_key=tensor_key),)


class ChunkKernels:
    """The kernels of one merge, bound to its settings and models: eager, ``torch.compile``d
    (``compile=True``), or built by a ``fuse`` strategy.

    ``fuse(name, fn, consts, tag, dims)`` returns a callable taking only the tensors (``consts``
    are bound; ``tag`` names them; ``dims`` the dynamic axes), e.g. kernels compiled ahead of time
    and cached on disk (``mmer_dist.merge.kernel_cache``). It serves kernels whose constants are
    the same for every chunk: not DARE (its seed depends on the tensor) nor NeuroMerging's final
    step (per-row eigendecompositions); chunks whose width is no multiple of ``fuse_cols_multiple``
    run eagerly.
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
        if fuse is not None and settings.dare_rate == 0.0:
            consts = dict(settings=settings, model_keys=self.model_keys, tensor_key=0)
            tag = f"{settings.method}|{settings.mask_rule}"
            if settings.method != "neuro":
                self._fused["final"] = fuse("final", final_chunk, {**consts, "ndim": 2}, tag, FINAL_DIMS)
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
        a 1M one. Eager kernels make N x block temporaries and keep ``default``-sized blocks."""
        return 1 << 62 if "final" in self._fused and self._fusable(cols) else default

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
        if self.settings.method == "neuro":
            check_neuron_rank(info.tensor, info.ndim)
        dev = models.device
        if (fused := self._fused_for("final", models)) is not None:
            return fused(models, base, thresholds.to(dev), torch.tensor(majority, dtype=torch.float32, device=dev),
                         lams.to(dev), self._offset(info, dev))
        return self._final(models, base, thresholds.to(dev), torch.tensor(majority, dtype=torch.float32, device=dev),
                           lams.to(dev), self._offset(info, dev), settings=self.settings,
                           model_keys=self.model_keys, tensor_key=baselines.stable_key(info.tensor), ndim=info.ndim)
